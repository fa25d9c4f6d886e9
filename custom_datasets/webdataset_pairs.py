"""Image-caption pairs from WebDataset tar shards (the CC3M/CC12M layout img2dataset writes):
members `KEY.jpg|png|webp` + `KEY.txt` or `KEY.json` (`{"caption": ...}`) grouped by key.

Read with the standard library (no extra dependency). Each epoch yields exactly `num_samples /
world_size` samples per rank, so every rank runs the same number of steps (no DDP hang): shards
are split over all (rank, worker) readers when there are enough of them, otherwise every reader
walks the shards and keeps every n-th sample; readers cycle their shards when they run out."""
from __future__ import annotations

import glob
import io
import json
import logging
import random
import re
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


def expand_shards(spec: str) -> list[Path]:
    """`DIR`, a glob (`shards/*.tar`) or a brace range (`shards/{00000..00099}.tar`) -> shard paths."""
    path = Path(spec)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
    else:
        match = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
        if match:
            lo, hi = match.group(1), match.group(2)
            names = [spec[:match.start()] + str(i).zfill(len(lo)) + spec[match.end():] for i in range(int(lo), int(hi) + 1)]
            shards = [Path(n) for n in names]
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


def read_shard(path: Path) -> Iterator[dict[str, Any] | None]:
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
        with tarfile.open(path) as tar:
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
    """Exactly `num_samples // world_size` samples per rank and epoch (call `set_epoch` each epoch)."""

    def __init__(self, shards: list[Path], num_samples: int, build: Callable[[Image.Image], dict[str, Any]],
                 seed: int = 0, shuffle: bool = True) -> None:
        self.shards, self.build, self.seed, self.shuffle = shards, build, seed, shuffle
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
        if len(order) >= readers:
            mine, keep = order[reader::readers], (lambda i: True)
        else:
            mine, keep = order, (lambda i: i % readers == reader)
        produced = 0
        while produced < quota:
            seen = 0
            for shard in mine:
                for sample in read_shard(shard):
                    if not keep(seen):
                        seen += 1
                        continue
                    seen += 1
                    yield None if sample is None else {**self.build(sample["image"], seen), "caption": sample["caption"]}
                    produced += 1
                    if produced >= quota:
                        return
            if seen == 0:
                raise UserError(f"the shards given to --data_path hold no samples for reader {reader}")


def count_samples(shards: list[Path]) -> int:
    return sum(1 for shard in shards for _ in read_shard(shard))


def require_num_samples(num_samples: int | None) -> int:
    if not num_samples:
        raise UserError("--webdataset needs --train_num_samples N (the number of pairs in the shards; "
                        "img2dataset prints it), so the lr schedule and every rank know the epoch length")
    return num_samples

