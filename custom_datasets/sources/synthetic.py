"""The embedded synthetic world: scenes, their captions, or both as pairs. Asked for by name only
(`--data_path synthetic`): a run never falls back to it."""
from __future__ import annotations

from custom_datasets.pair_data import SyntheticCaptions
from custom_datasets.settings import PretrainDataConfig, is_synthetic
from custom_datasets.sources.base import DataSource
from custom_datasets.synthetic_world import SyntheticWorld


def _claims(cfg: PretrainDataConfig, kind: str) -> bool:
    # captions or pairs of the run's own files come first; the world's images stay its images
    return is_synthetic(cfg) and (kind == "image" or not (cfg.text.data_file_path or cfg.text.webdataset))


def _build(cfg: PretrainDataConfig, kind: str, builders):
    data = cfg.data
    if kind == "text":
        return (SyntheticCaptions("train", data.synthetic_train_size, cfg.seed),
                SyntheticCaptions("val", data.synthetic_val_size, cfg.seed))
    train_build, val_build = builders  # a scene carries its captions: the pair kind reads the same samples
    return (SyntheticWorld("train", data.synthetic_train_size, cfg.seed, data.synthetic_render_size, train_build),
            SyntheticWorld("val", data.synthetic_val_size, cfg.seed, data.synthetic_render_size, val_build))


SOURCE = DataSource("synthetic", "--data_path synthetic", ("image", "text", "pair"), _claims, _build,
                    lambda cfg, what: f"{what} of the embedded synthetic world")
