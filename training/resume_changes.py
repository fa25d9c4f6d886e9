"""What a resumed run may change. Every run checkpoint records the run's settings (`args`) and its
visual tokenizer's content (a digest of its tensors, so a different file at the same path counts).
A resume compares them with its own: what defines the MIM targets, the text vocabulary or the LoRA
adapters cannot change (the checkpoint's heads and adapters mean something else under them) and is
refused in one sentence; what changes only the optimisation or the data (batch size, lr, epochs,
data paths, ...) continues, and is said; workers, printing and paths of the run's own files are not
compared. `args.yaml` then describes the resumed run; the one before is kept beside it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from common.checkpoint_io import tensors_digest
from common.errors import UserError

# setting -> what it defines; a change cannot continue the run
DEFINING = {
    "exp_name": "the objective", "d_vae_type": "the MIM targets", "visual_vocab_size": "the MIM targets",
    "second_image_size": "the MIM targets", "tokenizer": "the text vocabulary", "lora_rank": "the adapters",
    "lora_alpha": "the adapters' scaling", "lora_trainable": "which adapter factors train",
    "reg_delta": "the self-regularization penalty", "early_layers": "the MIM heads (BEiT v2's patch aggregation)",
    "head_layers": "the MIM heads (BEiT v2's patch aggregation)",
    "shared_lm_head": "the MIM heads (BEiT v2's patch aggregation)",
}
# defining settings older checkpoints do not record: their runs had these values
RECORDED_SINCE = {"early_layers": None, "head_layers": 2, "shared_lm_head": True}
# compared by the tokenizer's content instead, or belonging to where and how the run prints and writes
NOT_COMPARED = frozenset({"d_vae_weight_path", "output_dir", "log_dir", "resume", "auto_resume", "init_from",
                          "num_workers", "print_freq", "pin_mem", "no_pin_mem", "no_pictures", "eval", "local_rank",
                          "dist_url", "world_size", "start_epoch", "save_every_steps",
                          "keep_last_checkpoints"})
TOKENIZER_DIGEST = "visual_tokenizer_digest"


def tokenizer_digest(module: torch.nn.Module | None) -> str | None:
    """The visual tokenizer's content: a digest of its tensors, independent of any path."""
    return tensors_digest(module.state_dict()) if module is not None else None


def resume_changes(path: str, recorded: dict[str, Any], current: dict[str, Any], recorded_tokenizer: str | None,
                   current_tokenizer: str | None) -> list[str]:
    """The settings a resume changes, as 'name old -> new'; refuses a change that cannot continue."""
    if recorded_tokenizer and current_tokenizer and recorded_tokenizer != current_tokenizer:
        then = recorded.get("d_vae_weight_path")
        where = then if then and Path(then).exists() else f"the file it was trained with (recorded as {then}, gone now)"
        raise UserError(f"--resume {path} was trained with another visual tokenizer than this run's "
                        f"({recorded.get('d_vae_type')} from {then} then, {current.get('d_vae_type')} from "
                        f"{current.get('d_vae_weight_path')} now, with other weights): its MIM head predicts that "
                        f"tokenizer's tokens; resume with --d_vae_weight_path {where}, or start a new stage from it "
                        f"with --init_from")
    recorded = {**RECORDED_SINCE, **recorded}
    for name, meaning in DEFINING.items():
        if name in recorded and name in current and recorded[name] != current[name]:
            raise UserError(f"--resume {path} was trained with --{name} {recorded[name]}, this run has {current[name]}: "
                            f"that changes {meaning}, so the run cannot continue; resume with --{name} {recorded[name]}, "
                            f"or start a new stage from it with --init_from")
    return [f"{name} {recorded[name]} -> {value}" for name, value in sorted(current.items())
            if name in recorded and name not in NOT_COMPARED and name not in DEFINING and recorded[name] != value]


def keep_previous_settings(output_dir: Path, name: str, trained: str) -> Path | None:
    """A resume that changed settings: the run's earlier `args.yaml` is kept as
    `args-until-epoch-N.yaml` (`trained` = N: the last epoch trained with it; `E-stepB` when the resumed
    checkpoint stopped within epoch E after B batches) before the new one is written."""
    current = output_dir / name
    if not current.is_file():
        return None
    kept = output_dir / f"{Path(name).stem}-until-epoch-{trained}{Path(name).suffix}"
    if not kept.exists():
        current.rename(kept)
        return kept
    return None
