"""Experience replay: a share --replay_ratio of every step's samples comes from the earlier stages'
training data, trained with their own objectives and their own heads (carried in the checkpoint,
kept frozen), beside the stage's batch. The earlier stages are found by following --init_from back
through the stage folders' args.yaml; each is rebuilt from those settings (data, masking, its
visual tokenizer). With B samples of the stage and r replayed ones, r = round(B·ρ/(1 − ρ)) split
evenly over the earlier objectives, and each replayed loss enters with weight r_k / B, so the step
minimises the mean loss over the B + r samples (up to the factor B / (B + r))."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from common.console import say
from common.errors import UserError
from custom_datasets import batch as B
from training.batch import BatchPreparer
from training.continual.base import ContinualMethod

if TYPE_CHECKING:
    from training.continual.base import Stage


def replay_sizes(batch: int, ratio: float, sources: int) -> list[int]:
    """Replayed samples per earlier objective: together the closest count to a share `ratio` of
    the step's samples, split as evenly as possible."""
    total = round(batch * ratio / (1 - ratio))
    return [total // sources + (k < total % sources) for k in range(sources)]


@dataclass
class ReplaySource:
    name: str  # the earlier stage's objective
    folder: Path
    mode: torch.nn.Module  # that objective's mode on this stage's backbone, with its carried head
    loader: Any
    batches: Iterator[dict[str, Any]]
    prepare: BatchPreparer
    size: int


def earlier_stage_folders(start: str | None) -> list[Path]:
    """Folders of the stages before this one, nearest first (following --init_from through args.yaml)."""
    import yaml

    folders, seen = [], set()
    while start:
        folder = Path(start).resolve().parent
        args = folder / "args.yaml"
        if not args.is_file() or folder in seen:
            break
        seen.add(folder)
        folders.append(folder)
        start = (yaml.safe_load(args.read_text()) or {}).get("init_from")
    return folders


def _cycle(loader) -> Iterator[dict[str, Any]]:
    """The loader's batches without end, in a new order each pass (a distributed sampler is told)."""
    passes = 0
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(passes)
        yield from loader
        passes += 1


class ExperienceReplay(ContinualMethod):
    name = "replay"
    reads = frozenset({"reg_loss_weight", "replay_ratio"})
    description = "a share --replay_ratio of each step's samples replayed from earlier stages' data and objectives"
    needs_previous = True
    has_penalty = True
    replays = True

    def start(self, run: "Stage") -> None:
        ratio = run.cfg.continual.replay_ratio
        objectives: dict[str, tuple[Path, Any]] = {}  # objective -> (its stage folder, that stage's settings)
        for folder in earlier_stage_folders(run.cfg.model.init_from):
            cfg = run.stage_config(folder)
            if cfg.exp_name != run.cfg.exp_name and cfg.exp_name not in objectives:
                objectives[cfg.exp_name] = (folder, cfg)
        if not objectives:
            raise UserError(f"--cl_method replay found no earlier stage with another objective behind --init_from "
                            f"{run.cfg.model.init_from} (it follows the args.yaml of each stage folder); start from a "
                            f"stage's checkpoint or merged_model.safetensors in its own folder")
        sizes = replay_sizes(run.cfg.optim.batch_size, ratio, len(objectives))
        self.batch = run.cfg.optim.batch_size
        self.sources = [self._source(run, exp, folder, cfg, size)
                        for (exp, (folder, cfg)), size in zip(objectives.items(), sizes) if size > 0]
        say(f"replay: {' + '.join(f'{s.size} {s.name} samples ({s.folder})' for s in self.sources)} beside each "
            f"{self.batch} of this stage (share {sum(sizes) / (self.batch + sum(sizes)):.3f}, asked {ratio:g})")

    def _source(self, run: "Stage", exp: str, folder: Path, cfg, size: int) -> ReplaySource:
        from custom_datasets.pretrain_data import build_pretrain_data
        from models.modes import PRETRAIN_MODES
        from models.visual_tokenizers import create_visual_tokenizer

        mode_cls = PRETRAIN_MODES[exp]
        tokenizer = None
        if mode_cls.needs_visual_tokens:
            tok = cfg.visual_tokenizer
            path = tok.d_vae_weight_path if tok.d_vae_type == "dall-e" or tok.d_vae_weight_path else \
                folder / "visual_tokenizer.safetensors"
            tokenizer = create_visual_tokenizer(tok.d_vae_type, path, tok.second_image_size,
                                                expected_grid=run.grid[0]).to(run.ctx.device)
        mode = mode_cls(run.backbone, run.mode_options(tokenizer))
        for head in mode.heads:
            if head not in run.carried.modules:
                raise UserError(f"--cl_method replay: the {head} of {exp} ({folder}) is not in --init_from "
                                f"{run.cfg.model.init_from}; start from a checkpoint that carries the earlier heads")
            setattr(mode, head, run.carried.modules[head].requires_grad_(False))
        data = build_pretrain_data(cfg.data_config, mode_cls.data_kind, run.grid, run.text_tokenizer,
                                   mode_cls.needs_mlm_masks)
        loader = run.ctx.loader(data.train, size, run.cfg.data.num_workers, True, data.train_collate)
        mode.to(run.ctx.device).train()
        return ReplaySource(exp, folder, mode, loader, _cycle(loader), BatchPreparer(run.ctx.device, mode_cls.batch_keys,
                                                                             tokenizer), size)

    def batch_penalty(self, batch: dict[str, Any]) -> torch.Tensor:
        terms = []
        for source in self.sources:
            replayed = next(source.batches)
            replayed.pop(B.NUM_SKIPPED, None)
            terms.append(source.mode(source.prepare(replayed))["loss"] * (source.size / self.batch))
        return torch.stack(terms).sum()
