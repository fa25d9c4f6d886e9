"""Checkpoint paths that help texts and the README tell users to pass are the ones the demos write."""
import re
from pathlib import Path

import yaml

from training.config import PretrainRunSettings
from training.scaffold import checkpoint_due
from experiments.demo_chain import itc_checkpoint, mim_checkpoint, parser

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED = re.compile(r"outputs/demo_(?:image_mim|chain)/[\w/.-]*checkpoint-\d+\.pth")


def documented_paths() -> dict[str, set[str]]:
    """Each documented demo checkpoint path -> the files that mention it."""
    found: dict[str, set[str]] = {}
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *ROOT.glob("*.py"), *(ROOT / "util").glob("*.py"),
             *(ROOT / "experiments").glob("*.py"), *(ROOT / "training").glob("*.py")]
    for path in files:
        for match in DOCUMENTED.findall(path.read_text()):
            found.setdefault(match, set()).add(path.name)
    return found


def demo_checkpoints() -> set[str]:
    """What `main_pretrain_cook.py --config configs/demo_image_mim.yaml` and `experiments/demo_chain.py` (defaults) write."""
    demo = yaml.safe_load((ROOT / "configs" / "demo_image_mim.yaml").read_text())
    epochs = demo["epochs"]
    every = demo.get("save_per_epochs", PretrainRunSettings.save_per_epochs)
    written = {f"{demo['output_dir']}/checkpoint-{e}.pth" for e in range(epochs) if checkpoint_due(e, epochs, every)}
    chain = parser().parse_args([])
    written.add(mim_checkpoint(Path(chain.output_dir), chain.mim_epochs).as_posix())
    written |= {itc_checkpoint(Path(chain.output_dir), w, chain.itc_epochs).as_posix() for w in (0, chain.reg_loss_weight)}
    return written


def test_documented_demo_checkpoints_are_written_by_the_demos():
    documented = documented_paths()
    assert documented, "the README no longer names a demo checkpoint; update this test's pattern"
    missing = {p: sorted(f) for p, f in documented.items() if p not in demo_checkpoints()}
    assert not missing, f"named in help/README but never written by the demos: {missing}"


def test_the_pattern_catches_a_wrong_example():
    assert "outputs/demo_image_mim/checkpoint-11.pth" not in demo_checkpoints()
    assert "outputs/demo_image_mim/checkpoint-9.pth" in demo_checkpoints()


def test_every_shipped_config_parses_as_the_flags_would():
    """Each `configs/*.yaml` goes through the same validation as flags; the small-data config needs
    the user's folder and says so rather than falling back to built-in data."""
    import pytest

    from common.errors import UserError
    from training.cli import pretrain_config_from_argv

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        values = yaml.safe_load(path.read_text())
        cfg = pretrain_config_from_argv(["--config", str(path), "--data_path", "synthetic"])
        assert cfg.exp_name == values["exp_name"] and cfg.optim.epochs == values["epochs"], path.name
    with pytest.raises(UserError, match="needs data: pass --data_path IMAGE_FOLDER"):
        pretrain_config_from_argv(["--config", str(ROOT / "configs" / "small_data_image_mim.yaml")])
