"""Image-caption pairs from WebDataset tar shards (the CC3M/CC12M layout img2dataset writes):
members `KEY.jpg|png|webp` + `KEY.txt` or `KEY.json` (`{"caption": ...}`) grouped by key.

Read with the standard library (no extra dependency). Each epoch yields exactly `num_samples /
world_size` samples per rank, so every rank runs the same number of steps (no DDP hang): shards
are split over all (rank, worker) readers when there are enough of them, otherwise every reader
walks the shards and keeps every n-th sample; readers cycle their shards when they run out."""
from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import random
import re
import subprocess
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from common import distributed as dist_util
from common.errors import UserError
from custom_datasets.text_data import captions_of

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


PIPE = "pipe:"  # a shell command whose standard output is the tar stream (webdataset's and open_clip's spelling)


def _brace_range(spec: str) -> list[str]:
    match = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if not match:
        return [spec]
    lo, hi = match.group(1), match.group(2)
    return [spec[:match.start()] + str(i).zfill(len(lo)) + spec[match.end():] for i in range(int(lo), int(hi) + 1)]


def expand_shards(spec: str) -> list[Path | str]:
    """`DIR`, a glob (`shards/*.tar`), a brace range (`shards/{00000..00099}.tar`) or a command
    (`pipe:curl -s https://host/shards/{00000..00099}.tar`, one command per shard) -> shards."""
    if spec.startswith(PIPE):
        return _brace_range(spec)
    path = Path(spec)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
    elif re.search(r"\{(\d+)\.\.(\d+)\}", spec):
        shards = [Path(n) for n in _brace_range(spec)]
        missing = [s for s in shards if not s.is_file()]
        if missing:
            raise UserError(f"--data_path {spec}: shard {missing[0]} does not exist ({len(missing)} missing)")
    else:
        shards = sorted(Path(p) for p in glob.glob(spec))
    if not shards:
        raise UserError(f"--data_path {spec} matches no .tar shards; pass a folder of shards, a glob or a "
                        f"brace range such as shards/{{00000..00099}}.tar")
    return shards


def _caption(raw: bytes, suffix: str) -> str | list[str]:
    text = raw.decode("utf-8")
    if suffix == ".json":
        value = json.loads(text)
        return value["caption"] if isinstance(value, dict) else value
    return text.strip()


@contextlib.contextmanager
def open_tar(shard: Path | str) -> Iterator[tarfile.TarFile]:
    """A shard file, or the stream a `pipe:` command writes (read in order, as it arrives)."""
    if not str(shard).startswith(PIPE):
        with tarfile.open(shard) as tar:
            yield tar
        return
    command = str(shard)[len(PIPE):]
    process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with tarfile.open(fileobj=process.stdout, mode="r|*") as tar:
            yield tar
    finally:
        process.stdout.close()
        if process.wait() != 0:
            log.warning("shard command %r ended with status %s: %s", command, process.returncode,
                        process.stderr.read().decode(errors="replace").strip()[-300:])
        process.stderr.close()


def read_shard(path: Path | str) -> Iterator[dict[str, Any] | None]:
    """`{"image": PIL, "caption": ...}` per complete key, None for a sample that cannot be decoded."""
    def finish(parts: dict[str, bytes]) -> dict[str, Any] | None:
        image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
        text = next(((parts[e], e) for e in (".txt", ".json") if e in parts), None)
        if image is None or text is None:
            return None
        try:
            caption = _caption(*text)
            if not captions_of({"caption": caption}):  # nothing to learn from an empty caption
                return None
            return {"image": Image.open(io.BytesIO(image)).convert("RGB"), "caption": caption}
        except Exception as err:  # noqa: BLE001 - a bad member is skipped and counted
            log.debug("skipping a bad sample in %s: %s", path, err)
            return None

    key, parts = None, {}
    try:
        with open_tar(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                stem, dot, ext = member.name.rpartition(".")
                if key is not None and stem != key:
                    yield finish(parts)
                    parts = {}
                key = stem
                parts["." + ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as err:
        log.warning("shard %s is unreadable or truncated (%s); skipping the rest of it", path, err)
    if parts:
        yield finish(parts)


class WebDatasetPairs(IterableDataset):
    """Exactly `num_samples // world_size` samples per rank and epoch (call `set_epoch` each epoch).
    `resampled`: each reader draws whole shards with replacement (open_clip's --dataset-resampled),
    seeded by (seed, epoch, reader); `shuffle_buffer` N: samples leave through a buffer of N from
    which a seeded random one is taken as each new one arrives (0: the shards' own order)."""

    def __init__(self, shards: list[Path | str], num_samples: int, build: Callable[[Image.Image], dict[str, Any]],
                 seed: int = 0, shuffle: bool = True, resampled: bool = False, shuffle_buffer: int = 0) -> None:
        self.shards, self.build, self.seed, self.shuffle = shards, build, seed, shuffle
        self.resampled, self.shuffle_buffer = resampled, shuffle_buffer
        self.per_rank = num_samples // dist_util.world_size()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        readers, reader = dist_util.world_size() * workers, dist_util.rank() * workers + worker
        quota = self.per_rank // workers + (1 if worker < self.per_rank % workers else 0)
        order = list(self.shards)
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        rng = random.Random(f"{self.seed}:{self.epoch}:{reader}")
        stream = self._resampled(order, rng) if self.resampled else self._split(order, readers, reader)
        if self.shuffle_buffer > 1:
            stream = _through_buffer(stream, self.shuffle_buffer, rng)
        for produced, (seen, sample) in enumerate(stream):
            if produced >= quota:
                return
            yield None if sample is None else {**self.build(sample["image"], seen), "caption": sample["caption"]}

    @staticmethod
    def _split(order: list, readers: int, reader: int) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """This reader's part of the shards (whole shards when there are enough, else every
        readers-th sample), cycled."""
        if len(order) >= readers:
            mine, keep = order[reader::readers], (lambda i: True)
        else:
            mine, keep = order, (lambda i: i % readers == reader)
        while True:
            seen = 0
            for shard in mine:
                for sample in read_shard(shard):
                    seen += 1
                    if keep(seen - 1):
                        yield seen, sample
            if seen == 0:
                raise UserError(f"the shards given to --data_path hold no samples for reader {reader}")

    @staticmethod
    def _resampled(order: list, rng: random.Random) -> Iterator[tuple[int, dict[str, Any] | None]]:
        seen, empty_draws = 0, 0
        while True:
            before = seen
            for sample in read_shard(rng.choice(order)):
                seen += 1
                yield seen, sample
            empty_draws = empty_draws + 1 if seen == before else 0
            if empty_draws > 3 * len(order):
                raise UserError("the shards given to --data_path hold no samples (every draw of --dataset_resampled "
                                "came back empty)")


def _through_buffer(stream: Iterator, size: int, rng: random.Random) -> Iterator:
    """A seeded shuffle of an endless stream through a buffer of `size` items."""
    buffer: list = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = item


def count_samples(shards: list[Path]) -> int:
    return sum(1 for shard in shards for _ in read_shard(shard))


def require_num_samples(num_samples: int | None) -> int:
    if not num_samples:
        raise UserError("--webdataset needs --train_num_samples N (the number of pairs in the shards; "
                        "img2dataset prints it), so the lr schedule and every rank know the epoch length")
    return num_samples

