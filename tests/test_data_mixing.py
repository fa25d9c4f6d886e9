"""Image sources mixed with weights (`--data_path "A::B" --data_weights 3 1`): exact shares per
epoch, every sample of an under-drawn source seen over the epochs and an over-drawn one repeated
evenly, ranks disjoint and equal, the same draw for the same (seed, epoch); end to end, the run
reports its mix and the flags are checked."""
from __future__ import annotations

from collections import Counter

import pytest
from PIL import Image
from torch.utils.data import Dataset

from custom_datasets.mixing import MixedSources, MixtureSampler, exact_counts


class _Items(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


@pytest.mark.parametrize("total,weights,expected", [(10, [3, 1], [8, 2]), (7, [1, 1, 1], [3, 2, 2]),
                                                     (100, [0.2, 0.8], [20, 80]), (5, [1, 0], [5, 0])])
def test_exact_counts_sum_and_follow_the_weights(total, weights, expected):
    counts = exact_counts(total, weights)
    assert counts == expected and sum(counts) == total


def test_each_epoch_takes_exact_shares_and_sources_are_walked_evenly():
    data = MixedSources([_Items(10), _Items(40)], [3, 1], ["a", "b"])  # 50 per epoch: 38 of a, 12 of b
    sampler = MixtureSampler(data, rank=0, world=1, seed=0)
    seen_a, seen_b = Counter(), Counter()
    for epoch in range(10):
        sampler.set_epoch(epoch)
        picks = list(sampler)
        assert len(picks) == 50
        a, b = [i for i in picks if i < 10], [i - 10 for i in picks if i >= 10]
        assert (len(a), len(b)) == (38, 12)
        seen_a.update(a)
        seen_b.update(b)
    assert set(seen_b.values()) == {3}  # 120 draws of 40 images: every one exactly 3 times
    assert set(seen_a) == set(range(10)) and max(seen_a.values()) - min(seen_a.values()) <= 1  # 380 of 10: 38 each
    sampler.set_epoch(3)
    again = MixtureSampler(data, 0, 1, seed=0)
    again.set_epoch(3)
    assert list(sampler) == list(again)
    again.set_epoch(4)
    assert list(sampler) != list(again)


def test_ranks_get_equal_disjoint_parts_of_the_epoch():
    data = MixedSources([_Items(7), _Items(20)], [1, 2], ["a", "b"])
    parts = []
    for rank in range(2):
        sampler = MixtureSampler(data, rank, 2, seed=5)
        sampler.set_epoch(1)
        parts.append(list(sampler))
    assert len(parts[0]) == len(parts[1]) == 14  # 27 picks, padded to 28
    whole = MixtureSampler(data, 0, 1, seed=5)
    whole.set_epoch(1)
    everything = list(whole)
    assert sorted(parts[0] + parts[1]) == sorted(everything + everything[:1])


def _folder(root, count: int, colour: tuple[int, int, int]):
    root.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (40, 40), colour).save(root / f"{root.name}_{i}.png")
    return root


def _run(tmp_path, *extra):
    from main_pretrain_cook import main

    return main(["--device", "cpu", "--model", "vlmo_tiny_patch16", "--image_size", "32", "--patch_size", "8",
                 "--second_image_size", "16", "--visual_vocab_size", "8", "--tokenizer_fit_images", "32", "--batch_size",
                 "8", "--num_workers", "0", "--min_mask_patches_per_block", "4", "--no_pictures", "--val_fraction", "0.2",
                 *extra])


def test_a_run_mixes_two_folders_and_says_how(tmp_path, capsys):
    a = _folder(tmp_path / "red", 40, (200, 30, 30))
    b = _folder(tmp_path / "blue", 20, (30, 30, 200))
    _run(tmp_path, "--data_path", f"{a}::{b}", "--data_weights", "3", "1", "--epochs", "2",
         "--output_dir", str(tmp_path / "out"))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("data mix of epoch")]
    assert len(lines) == 2
    import re

    counts = [int(n) for n in re.findall(r" (\d+) \(0\.\d+\)", lines[0])]
    assert f"{a} " in lines[0] and f"{b} " in lines[0] and len(counts) == 2
    assert counts == exact_counts(sum(counts), [3, 1]) and 40 <= sum(counts) < 60  # the training images, 3 : 1


@pytest.mark.parametrize("extra,says", [
    (["--data_weights", "1"], "--data_weights has 1 values for 2 sources"),
    (["--data_weights", "1", "-1"], "argument --data_weights: -1 is not allowed: it must be at least 0"),
    (["--data_weights", "nan", "1"], "argument --data_weights: nan is not a number"),
    (["--data_weights", "0", "0"], "their sum above 0"),
])
def test_mixing_flags_are_one_sentence(tmp_path, capsys, extra, says):
    a, b = _folder(tmp_path / "a", 10, (0, 0, 0)), _folder(tmp_path / "b", 10, (255, 255, 255))
    with pytest.raises(SystemExit):
        _run(tmp_path, "--data_path", f"{a}::{b}", "--epochs", "1", "--output_dir", str(tmp_path / "o"), *extra)
    assert says in capsys.readouterr().err


def test_weights_need_several_sources_and_an_image_stage(tmp_path, capsys):
    a = _folder(tmp_path / "a", 10, (0, 0, 0))
    with pytest.raises(SystemExit):
        _run(tmp_path, "--data_path", str(a), "--data_weights", "1", "--epochs", "1", "--output_dir", str(tmp_path / "o"))
    assert "--data_weights mixes several sources" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run(tmp_path, "--data_path", f"{a}::{tmp_path / 'missing'}", "--epochs", "1", "--output_dir", str(tmp_path / "p"))
    assert "missing does not exist" in capsys.readouterr().err
