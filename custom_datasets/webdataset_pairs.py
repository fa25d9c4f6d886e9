"""Image-caption pairs from WebDataset tar shards (the CC3M/CC12M layout img2dataset writes):
members `KEY.jpg|png|webp` + `KEY.txt` or `KEY.json` (`{"caption": ...}`) grouped by key.

Read with the `webdataset` library's tar iterator (shard_sources.py says where shards come from:
files, commands, object stores). Each epoch yields exactly `num_samples /
world_size` samples per rank, so every rank runs the same number of steps (no DDP hang): shards
are split over all (rank, worker) readers when there are enough of them, otherwise every reader
walks the shards and keeps every n-th sample; readers cycle their shards when they run out."""
from __future__ import annotations

import io
import itertools
import json
import logging
import random
import tarfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from common import distributed as dist_util
from common.console import say
from common.errors import UserError
from common.url_secrets import masked_url
from custom_datasets.mixing import exact_counts
from custom_datasets.shard_sources import expand_shards, is_local, open_shard, stream_errors
from custom_datasets.text_data import captions_of

__all__ = ["WebDatasetPairs", "count_samples", "expand_shards", "read_shard", "require_num_samples"]

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


RETRIES, TIMEOUT = 3, 60.0  # defaults of --shard_retries and --shard_timeout


def _caption(raw: bytes, suffix: str) -> str | list[str]:
    text = raw.decode("utf-8")
    if suffix == ".json":
        value = json.loads(text)
        return value["caption"] if isinstance(value, dict) else value
    return text.strip()


def _pair(parts: dict[str, bytes], shard: Path | str) -> dict[str, Any] | None:
    """`{"image": PIL, "caption": ...}` from one key's members, None when it cannot be decoded."""
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
        log.debug("skipping a bad sample in %s: %s", masked_url(shard), err)
        return None


def _samples(stream, shard: Path | str, keep_partial: bool) -> Iterator[dict[str, Any] | None]:
    """The shard's samples in order: members streamed by webdataset's tar iterator and grouped by
    its key convention (`KEY.EXT`, the key up to the name's first dot, as img2dataset writes them).
    `keep_partial`: the sample being read when the stream breaks is given (complete or None) before
    the error (when the shard will not be read again)."""
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    key, parts = None, {}
    try:
        for member in tar_file_iterator(stream):
            stem, ext = base_plus_ext(member["fname"])
            if stem is None:
                continue
            if key is not None and stem != key:
                yield _pair(parts, shard)
                parts = {}
            key = stem
            parts["." + ext.lower()] = member["data"]
    except Exception:
        if parts and keep_partial:
            yield _pair(parts, shard)
        raise
    if parts:
        yield _pair(parts, shard)


def read_shard(shard: Path | str, retries: int = RETRIES, timeout: float = TIMEOUT) -> Iterator[dict[str, Any] | None]:
    """`{"image": PIL, "caption": ...}` per key, None for a sample that cannot be decoded. A local
    file that is unreadable or cut short gives what it holds; a remote shard or command whose
    stream breaks (a dropped connection, a timeout, an object gone) is opened again up to
    `retries` times, going on after the samples already given, then skipped with a warning."""
    given = 0
    for attempt in range(retries + 1):
        try:
            with open_shard(shard, timeout) as stream:
                last = is_local(shard) or attempt == retries
                for index, sample in enumerate(_samples(stream, shard, keep_partial=last)):
                    if index >= given:
                        given += 1
                        yield sample
            return
        except (tarfile.TarError, OSError) if is_local(shard) else stream_errors() as err:
            if is_local(shard) or attempt == retries:
                log.warning("shard %s is unreadable or cut short (%s: %s) after %d tries; skipping the rest of it "
                            "(%d samples read)", masked_url(shard), type(err).__name__, err, attempt + 1, given)
                return
            log.warning("shard %s: %s: %s; trying again (%d of %d)", masked_url(shard), type(err).__name__, err,
                        attempt + 1, retries)
            time.sleep(min(0.5 * 2 ** attempt, 8.0))


class WebDatasetPairs(IterableDataset):
    """Exactly `num_samples // world_size` samples per rank and epoch (call `set_epoch` each epoch).
    `shards`: one source's shards, or several sources' (a list of lists, `--data_path "A::B"`) mixed
    by `weights`: each reader takes from source k exactly its share w_k / Σw of its samples (largest
    remainders), spread evenly through its stream; every source is split over the readers (or
    resampled) on its own. `resampled`: each reader draws whole shards with replacement (open_clip's
    --dataset-resampled), seeded by (seed, epoch, reader); `shuffle_buffer` N: samples leave through
    a buffer of N from which a seeded random one is taken as each new one arrives (0: the shards'
    own order). `retries` / `timeout`: how a broken remote stream is retried (read_shard)."""

    def __init__(self, shards: list, num_samples: int, build: Callable[[Image.Image], dict[str, Any]],
                 seed: int = 0, shuffle: bool = True, resampled: bool = False, shuffle_buffer: int = 0,
                 weights: list[float] | None = None, names: list[str] | None = None, retries: int = RETRIES,
                 timeout: float = TIMEOUT) -> None:
        self.sources = [list(s) for s in shards] if shards and isinstance(shards[0], (list, tuple)) else [list(shards)]
        self.weights = list(weights) if weights else [1.0] * len(self.sources)
        self.names = names or [f"source {k}" for k in range(len(self.sources))]
        self.build, self.seed, self.shuffle = build, seed, shuffle
        self.resampled, self.shuffle_buffer, self.retries, self.timeout = resampled, shuffle_buffer, retries, timeout
        self.per_rank = num_samples // dist_util.world_size()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def quota(self, worker: int, workers: int) -> int:
        return self.per_rank // workers + (1 if worker < self.per_rank % workers else 0)

    def mix(self, workers: int) -> list[int]:
        """Samples of each source one rank reads per epoch (what its readers' schedules add up to)."""
        per_reader = [exact_counts(self.quota(w, workers), self.weights) for w in range(workers)]
        return [sum(column) for column in zip(*per_reader)]

    def describe_mix(self, workers: int) -> str:
        counts = self.mix(max(workers, 1))
        total = max(sum(counts), 1)
        return (", ".join(f"{name} {n} ({100 * n / total:.1f}%)" for name, n in zip(self.names, counts)) + " per rank"
                + (" (before the shuffle buffer, which mixes neighbouring samples)" if self.shuffle_buffer > 1 else ""))

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        readers, reader = dist_util.world_size() * workers, dist_util.rank() * workers + worker
        quota = self.quota(worker, workers)
        rng = random.Random(f"{self.seed}:{self.epoch}:{reader}")
        streams = [self._source_stream(k, readers, reader, rng) for k in range(len(self.sources))]
        stream = streams[0]
        if len(streams) > 1:  # endless: a shuffle buffer reads ahead of the quota
            stream = (next(streams[k]) for k in itertools.cycle(_interleaved(exact_counts(quota, self.weights))))
        if self.shuffle_buffer > 1:
            stream = _through_buffer(stream, self.shuffle_buffer, rng)
        for produced, (seen, sample) in enumerate(stream):
            if produced >= quota:
                return
            yield None if sample is None else {**self.build(sample["image"], seen), "caption": sample["caption"]}

    def _source_stream(self, k: int, readers: int, reader: int, rng: random.Random) -> Iterator:
        """Source k's endless stream for this reader (one source: the seeds it always had)."""
        tag = "" if len(self.sources) == 1 else f":source{k}"
        order = list(self.sources[k])
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}{tag}").shuffle(order)
        if self.resampled:
            own = rng if not tag else random.Random(f"{self.seed}:{self.epoch}:{reader}{tag}")
            return self._resampled(order, own)
        return self._split(order, readers, reader)

    def _read(self, shard: Path | str) -> Iterator[dict[str, Any] | None]:
        return read_shard(shard, self.retries, self.timeout)

    def _split(self, order: list, readers: int, reader: int) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """This reader's part of the shards (whole shards when there are enough, else every
        readers-th sample), cycled."""
        if len(order) >= readers:
            mine, keep = order[reader::readers], (lambda i: True)
        else:
            mine, keep = order, (lambda i: i % readers == reader)
        while True:
            seen = 0
            for shard in mine:
                for sample in self._read(shard):
                    seen += 1
                    if keep(seen - 1):
                        yield seen, sample
            if seen == 0:
                raise UserError(f"the shards given to --data_path hold no samples for reader {reader}")

    def _resampled(self, order: list, rng: random.Random) -> Iterator[tuple[int, dict[str, Any] | None]]:
        seen, empty_draws = 0, 0
        while True:
            before = seen
            for sample in self._read(rng.choice(order)):
                seen += 1
                yield seen, sample
            empty_draws = empty_draws + 1 if seen == before else 0
            if empty_draws > 3 * len(order):
                raise UserError("the shards given to --data_path hold no samples (every draw of --dataset_resampled "
                                "came back empty)")


def _interleaved(counts: list[int]) -> list[int]:
    """Source ids with these counts, each source's spread evenly over the sequence (by the midpoints
    (j + 1/2) / count_k), so any stretch of the stream holds about the sources' shares."""
    return [k for _, k in sorted(((j + 0.5) / n, k) for k, n in enumerate(counts) for j in range(n))]


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


def count_samples(shards: list[Path | str], retries: int = RETRIES, timeout: float = TIMEOUT) -> int:
    return sum(1 for shard in shards for _ in read_shard(shard, retries, timeout))


COUNTED_SHARDS = 256  # more local shards than this are not listed just to say how long an epoch is


def local_keys(shards: list[Path | str]) -> int | None:
    """The samples (keys with an image member) local shards hold, from their tar headers alone (no
    image is read); None when a shard is remote or a command, or there are too many to list."""
    if len(shards) > COUNTED_SHARDS or not all(is_local(s) for s in shards):
        return None
    keys = 0
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                keys += len({name.split("/")[-1].split(".")[0] for name in tar.getnames()
                             if Path(name).suffix.lower() in IMAGE_EXTENSIONS})
        except (OSError, tarfile.TarError):
            return None  # an unreadable shard is skipped and counted when it is read
    return keys


def note_epoch_length(num_samples: int, shards: list[Path | str]) -> None:
    """--train_num_samples against what the shards hold, when it is far from it: an epoch that
    repeats every sample many times, or reads a small part of them, is said once."""
    held = local_keys(shards)
    if not held or 0.5 <= num_samples / held <= 2:
        return
    what = (f"so an epoch reads each about {num_samples / held:.0f} times" if num_samples > held
            else f"so an epoch reads {num_samples / held:.1%} of them")
    say(f"--train_num_samples {num_samples}: the training shards hold {held} samples, {what}")


def require_num_samples(num_samples: int | None) -> int:
    if not num_samples:
        raise UserError("--webdataset needs --train_num_samples N (the number of pairs in the shards; "
                        "img2dataset prints it), so the lr schedule and every rank know the epoch length")
    return num_samples

