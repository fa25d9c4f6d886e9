"""WebDataset tar shards: grouping by key, captions from .txt and .json, bad members skipped and
counted, an exact sample count per epoch with and without workers, and a CLI run."""
from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from common.errors import UserError
from custom_datasets.collate import collate_skipping_bad
from custom_datasets.webdataset_pairs import WebDatasetPairs, count_samples, expand_shards, read_shard
from main_pretrain_cook import main
from tests.test_pretrain_cli import TINY, TINY_BASE


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shards(root, n_shards: int = 3, per_shard: int = 6, bad: int = 1):
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                buf = io.BytesIO()
                Image.new("RGB", (40, 40), (i * 30, s * 60, 100)).save(buf, format="PNG")
                image = b"not an image" if (s == 0 and i < bad) else buf.getvalue()
                _add(tar, f"{key}.png", image)
                if i % 2:
                    _add(tar, f"{key}.json", json.dumps({"caption": f"shard {s} item {i}"}).encode())
                else:
                    _add(tar, f"{key}.txt", f"shard {s} item {i}".encode())
    return root


def test_shards_are_read_by_key_and_bad_members_skipped(tmp_path):
    shards = expand_shards(str(make_shards(tmp_path / "wds")))
    assert len(shards) == 3 and expand_shards(str(tmp_path / "wds" / "{00000..00002}.tar")) == shards
    samples = list(read_shard(shards[0]))
    assert len(samples) == 6 and samples[0] is None and samples[1]["caption"] == "shard 0 item 1"
    assert count_samples(shards) == 18
    with pytest.raises(UserError, match="does not exist"):
        expand_shards(str(tmp_path / "wds" / "{00000..00009}.tar"))


@pytest.mark.parametrize("workers", [0, 2])
def test_every_epoch_has_exactly_the_requested_number_of_samples(tmp_path, workers):
    shards = expand_shards(str(make_shards(tmp_path / "wds")))
    data = WebDatasetPairs(shards, 25, lambda image, key=None: {"size": image.size[0]})  # more than the shards hold: cycles
    loader = DataLoader(data, batch_size=5, num_workers=workers, collate_fn=collate_skipping_bad)
    batches = list(loader)
    assert sum(len(b.get("size", [])) + int(b["num_skipped"]) for b in batches) == 25
    assert sum(int(b["num_skipped"]) for b in batches) >= 1


def test_cli_trains_itc_on_shards(tmp_path):
    shards = make_shards(tmp_path / "wds")
    val = make_shards(tmp_path / "val", n_shards=1, bad=0)
    from util.train_text_tokenizer import main as train_tokenizer

    tok = train_tokenizer(["--data_file_path", "synthetic", "--vocab_size", "100", "--output", str(tmp_path / "tok")])
    out = tmp_path / "run"
    main(TINY_BASE + ["--exp_name", "image_text_itc", "--webdataset", "--data_path", str(shards), "--train_num_samples", "16",
                 "--eval_data_path", str(val), "--tokenizer", str(tok), "--epochs", "1", "--output_dir", str(out)])
    log = json.loads((out / "log.txt").read_text().splitlines()[0])
    assert log["train_skipped_samples"] == 1 and "test_acc_i2t" in log
    with pytest.raises(SystemExit):
        main(TINY_BASE + ["--exp_name", "image_text_itc", "--webdataset", "--data_path", str(shards), "--tokenizer", str(tok),
                     "--output_dir", str(tmp_path / "x")])


def _captions(data: WebDatasetPairs, epoch: int = 0) -> list[str | None]:
    data.set_epoch(epoch)
    return [None if s is None else s["caption"] for s in data]


def test_pipe_commands_stream_the_same_samples_as_the_files(tmp_path):
    make_shards(tmp_path / "wds")
    commands = expand_shards(f"pipe:cat {tmp_path / 'wds'}/{{00000..00002}}.tar")
    files = expand_shards(str(tmp_path / "wds"))
    assert commands == [f"pipe:cat {f}" for f in files]
    for command, path in zip(commands, files):
        streamed, read = list(read_shard(command)), list(read_shard(path))
        assert [s and s["caption"] for s in streamed] == [s and s["caption"] for s in read] and len(read) == 6
    assert list(read_shard(f"pipe:cat {tmp_path / 'missing.tar'}")) == []  # a failing command: logged, no samples


def test_resampled_shards_are_drawn_with_replacement_and_seeded(tmp_path):
    shards = expand_shards(str(make_shards(tmp_path / "wds", bad=0)))
    build = lambda image, key=None: {}  # noqa: E731
    data = WebDatasetPairs(shards, 30, build, seed=3, resampled=True)
    first = _captions(data)
    assert len(first) == 30 and max(first.count(c) for c in set(first)) >= 2  # 30 from 18 samples: repeats
    assert _captions(WebDatasetPairs(shards, 30, build, seed=3, resampled=True)) == first
    assert _captions(data, epoch=1) != first
    assert all(first[i].split(" item")[0] == first[i + 1].split(" item")[0] for i in range(5))  # whole shards


def test_a_shuffle_buffer_reorders_the_stream_deterministically(tmp_path):
    shards = expand_shards(str(make_shards(tmp_path / "wds", bad=0)))
    build = lambda image, key=None: {}  # noqa: E731
    plain = _captions(WebDatasetPairs(shards, 18, build, shuffle=False))
    buffered = _captions(WebDatasetPairs(shards, 18, build, shuffle=False, shuffle_buffer=8))
    assert buffered != plain and set(buffered) <= set(plain) and len(set(buffered)) > 12
    assert _captions(WebDatasetPairs(shards, 18, build, shuffle=False, shuffle_buffer=8)) == buffered


def test_cli_streams_resampled_shards_through_a_command(tmp_path, capsys):
    make_shards(tmp_path / "wds")
    val = make_shards(tmp_path / "val", n_shards=1, bad=0)
    from util.train_text_tokenizer import main as train_tokenizer

    tok = train_tokenizer(["--data_file_path", "synthetic", "--vocab_size", "100", "--output", str(tmp_path / "tok")])
    out = tmp_path / "run"
    main(TINY_BASE + ["--exp_name", "image_text_itc", "--webdataset", "--data_path",
                 f"pipe:cat {tmp_path / 'wds'}/{{00000..00002}}.tar", "--train_num_samples", "16",
                 "--dataset_resampled", "--shuffle_buffer", "4", "--eval_data_path", str(val), "--tokenizer", str(tok),
                 "--epochs", "1", "--output_dir", str(out)])
    assert "test_acc_i2t" in json.loads((out / "log.txt").read_text().splitlines()[0])
    with pytest.raises(SystemExit):
        main(TINY + ["--exp_name", "image_mim", "--data_path", "synthetic", "--dataset_resampled", "--output_dir",
                     str(tmp_path / "x")])
    assert "--dataset_resampled is read only by runs with --webdataset: nothing in this run reads it" in \
        capsys.readouterr().err
