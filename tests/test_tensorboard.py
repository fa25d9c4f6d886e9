"""TensorBoard after an interrupted stage is re-run: the resumed run purges what the first one
logged after its checkpoint, so every curve has one value per step, equal to log.txt's."""
from __future__ import annotations

import json

import pytest

from main_pretrain_cook import main as pretrain
from tests.test_pretrain_cli import SYNTH, TINY


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_resumed_stage_does_not_double_its_curves(tmp_path):
    out = tmp_path / "run"
    argv = TINY + SYNTH + ["--epochs", "3", "--save_per_epochs", "1", "--output_dir", str(out)]
    pretrain(argv)
    (out / "checkpoint-2.pth").unlink()  # as if killed during epoch 2's checkpoint: epoch 2 is re-run
    pretrain(argv + ["--auto_resume"])
    assert len(list(out.glob("events.out.tfevents.*"))) == 2
    scalars = _scalars(out)
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in log] == [0, 1, 2]
    test_loss = scalars["test/loss"]
    assert [step for step, _ in test_loss] == [999, 1999, 2999]  # the end of each epoch, once
    assert [value for _, value in test_loss] == pytest.approx([line["test_loss"] for line in log], rel=1e-6)
    for tag, points in scalars.items():
        steps = [step for step, _ in points]
        assert steps == sorted(set(steps)), f"{tag} has a step twice: {steps}"
