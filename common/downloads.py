"""Weights fetched once into the standard caches, checked, and reused offline: `https://` files
through torch.hub's downloader into torch's cache (`$TORCH_HOME/hub/checkpoints`), Hugging Face
repositories through `huggingface_hub` into its cache (`HF_HOME`, `HF_ENDPOINT`, `HF_HUB_OFFLINE`
and tokens as it honours them). A download is written under a temporary name and renamed when
whole (torch.hub does), then checked: against the publisher's sha256 (or its prefix, torch.hub's
file-name convention) when there is one, and always against the length the server announced, since
a connection dropped mid-file otherwise leaves a short file that looks complete. A file that fails
is deleted and fetched again once; one that fails again is one sentence. Processes that fetch the
same file at once (the ranks of a torchrun, two runs) take turns on a lock beside it: one downloads,
the others find it done."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from common.console import say
from common.errors import UserError
from common.url_secrets import masked_url

CHUNK = 1 << 20


@dataclass(frozen=True)
class Expected:
    """What a publisher says of a file: its sha256 (or the prefix torch.hub puts in file names), its size."""

    sha256: str | None = None
    size: int | None = None


def cache_dir() -> Path:
    """torch's cache of downloaded weights: `$TORCH_HOME/hub/checkpoints` (~/.cache/torch/...)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def offline() -> bool:
    """No downloads: Hugging Face's switch, which a user of an offline machine has set already."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def held(lock_path: Path) -> Iterator[None]:
    """An exclusive lock on `lock_path` for the block (waits for another process's)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def problem_with(path: Path, expected: Expected, announced: int | None) -> str | None:
    """Why `path` is not the file (None when it is)."""
    size = path.stat().st_size
    for wanted, what in ((announced, "the server announced"), (expected.size, "the publisher gives")):
        if wanted is not None and size != wanted:
            return f"it has {size} bytes where {what} {wanted} (cut off, or another file)"
    if expected.sha256 and not sha256_of(path).startswith(expected.sha256.lower()):
        return f"its sha256 does not start with the publisher's {expected.sha256}"
    return None


def announced_length(url: str, timeout: float = 30.0) -> int | None:
    """The Content-Length a HEAD request announces (None when the server says none)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as response:
            length = response.headers.get("Content-Length")
    except urllib.error.URLError:
        return None  # the download itself says what is wrong
    return int(length) if length and length.isdigit() else None


def by_hand(url: str, dest: Path) -> str:
    return f"download it by hand and put it at {dest} (it is taken from there), or pass a local file instead"


def fetch_url(url: str, expected: Expected = Expected(), name: str | None = None) -> Path:
    """`url`'s file in torch's cache, downloaded (with a progress bar) unless a checked copy is there."""
    import torch

    dest = cache_dir() / (name or Path(urlsplit(url).path).name or "download")
    shown = masked_url(url)
    with held(dest.with_name(dest.name + ".lock")):
        if dest.is_file():
            problem = problem_with(dest, expected, None)
            if problem is None:
                return dest
            say(f"{dest} is not the file {shown} names ({problem}): fetching it again")
            dest.unlink()
        if offline():
            raise UserError(f"{shown} is not in the cache and HF_HUB_OFFLINE is set; {by_hand(url, dest)}")
        problem = "no attempt"
        for attempt in range(2):
            announced = announced_length(url)
            try:
                torch.hub.download_url_to_file(url, str(dest), progress=True)
            except urllib.error.HTTPError as err:
                raise UserError(f"{shown} answered HTTP {err.code} ({err.reason}): the address is wrong or the file "
                                f"moved; {by_hand(url, dest)}") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # refused, dropped, cut
                problem = f"the connection failed ({getattr(err, 'reason', err)})"
                continue
            problem = problem_with(dest, expected, announced)
            if problem is None:
                return dest
            dest.unlink()
            if attempt == 0:
                say(f"{shown}: the download is not the file ({problem}); fetching it again")
        raise UserError(f"{shown} could not be fetched whole ({problem}); {by_hand(url, dest)}")


def fetch_hf(repo: str, revision: str | None, needed: tuple[tuple[str, ...], ...],
             optional: tuple[str, ...] = ()) -> Path:
    """Files of a Hugging Face repository in the hub's cache, and its snapshot folder: of each group
    in `needed` the first the repository has, and each of `optional` it has."""
    from huggingface_hub.errors import EntryNotFoundError

    where = f"hf-hub:{repo}" + (f"@{revision}" if revision else "")
    folder = None
    for choices in needed:
        for name in choices:
            try:
                folder = _hub_file(repo, revision, name, where).parent
                break
            except EntryNotFoundError:
                continue
        else:
            raise UserError(f"{where} has none of {', '.join(choices)}; it is not the kind of repository this flag "
                            f"takes")
    for name in optional:
        try:
            _hub_file(repo, revision, name, where)
        except EntryNotFoundError:
            pass
    assert folder is not None
    return folder


def _hub_file(repo: str, revision: str | None, name: str, where: str) -> Path:
    """One file through huggingface_hub (its cache, HF_ENDPOINT, HF_HUB_OFFLINE, tokens, locks); a
    missing file raises EntryNotFoundError for the caller, anything else is one sentence."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(hf_hub_download(repo, name, revision=revision))
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise UserError(f"{where}: the hub has no such repository or revision ({type(err).__name__}); check the name, "
                        f"and log in (HF_TOKEN) for a gated one") from None
    except LocalEntryNotFoundError:
        raise UserError(f"{where} is not in the Hugging Face cache and the hub cannot be reached (or HF_HUB_OFFLINE is "
                        f"set); download it on a machine with the network (huggingface-cli download {repo}) and copy "
                        f"the cache (HF_HOME), or pass a local folder") from None
