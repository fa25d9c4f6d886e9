"""What every pretraining mode shares: a backbone, its own heads, declared batch keys and data
kind, and a forward that returns `loss` plus named scalars (`loss_*`, `acc_*`, ...)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from models.backbone import HoldsBackbone, VLMoBackbone

# Parameter-name fragments that only one input path uses; a mode that does not take a path leaves
# its parameters without gradient, so they are frozen when the run is built.
PATH_PARAMETERS: dict[str, tuple[str, ...]] = {
    "image": ("backbone.patch_embed.", "backbone.cls_token", "backbone.pos_embed", ".norm2_imag.", ".mlp_imag."),
    "masked_image": ("backbone.mask_token",),
    "text": ("backbone.text_embeddings.", ".norm2_text.", ".mlp_text."),
    "pair": ("backbone.token_type_embeddings", ".norm2_vl.", ".mlp_vl."),
}


def unused_parameter_names(module: nn.Module, paths: frozenset[str] | set[str]) -> list[str]:
    """Names of `module`'s parameters that only input paths outside `paths` use (no gradient ever)."""
    unused = [f for path, fragments in PATH_PARAMETERS.items() if path not in paths for f in fragments]
    used = [f for path in paths for f in PATH_PARAMETERS[path]]
    return [n for n, _ in module.named_parameters() if any(f in n for f in unused) and not any(f in n for f in used)]


@dataclass
class ModeOptions:
    """Run settings a mode may need, built once from the run config."""

    visual_vocab_size: int | None = None
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda x: x  # cross-rank gather for contrastive negatives
    mim_conduct_prob: float = 0.3
    mlm_conduct_prob: float = 0.8
    itc_conduct_prob: float = 1.0
    itm_conduct_prob: float = 0.0
    fused_mlm: bool = False  # compound_pretrain: MLM reads the caption fused with its image (VLMo)
    patch_aggregation: tuple[int, int, bool] | None = None  # image_mim: BEiT v2's (early, head layers, shared head)
    mae: Any = None  # image_mae: its MAEShape (decoder, mask ratio, pixel targets)
    seed: int = 0


class PretrainMode(HoldsBackbone, nn.Module):
    """Base class of a mode. Subclasses set `name`, `batch_keys`, `data_kind` ("image", "text" or
    "pair"), `paths` (subset of PATH_PARAMETERS) and `heads` (attribute names), and implement `forward`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""  # one line for --help
    batch_keys: ClassVar[tuple[str, ...]] = ()
    data_kind: ClassVar[str] = "image"
    paths: ClassVar[frozenset[str]] = frozenset()
    heads: ClassVar[tuple[str, ...]] = ()
    needs_visual_tokens: ClassVar[bool] = False
    needs_mlm_masks: ClassVar[bool] = False
    static_graph: ClassVar[bool] = True  # False: parameters used vary per step (DDP must look for unused ones)
    # what of a run's settings this mode reads (common/flag_scopes.py: a flag of a part no mode of the
    # run reads is refused): "image_views" (crops, colour, normalisation), "masking" (BEiT's masks),
    # "visual_tokens" (the MIM tokenizer and its view), "patch_aggregation", "text" (captions, their
    # length), "mlm" (word masking), "itc" (contrastive negatives), "pairs", "compound" (its mixing)
    reads: ClassVar[frozenset[str]] = frozenset()
    image_masks: ClassVar[str] = "beit"  # which masks its images get: BEiT's (--mask_strategy) or MAE's (--mask_ratio)
    # flag defaults of the objective's own recipe (below --config, a --preset and explicit flags)
    flag_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, backbone: VLMoBackbone, options: ModeOptions | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.options = options or ModeOptions()

    def check_batch(self, batch: dict[str, torch.Tensor]) -> None:
        missing = [k for k in self.batch_keys if k not in batch]
        if missing:
            raise KeyError(f"{self.name} needs batch keys {missing}; got {sorted(batch)}")

    def frozen_parameter_names(self) -> list[str]:
        """Parameters of input paths this mode never takes (frozen when the run is built)."""
        return unused_parameter_names(self, self.paths)

    def head_specs(self) -> dict[str, dict[str, Any]]:
        """`{head name: spec}` of this mode's heads, recorded in every checkpoint."""
        return {name: getattr(self, name).spec() for name in self.heads}

    def set_epoch(self, epoch: int) -> None:
        """Modes with per-step random choices re-seed them here (identical on every rank)."""

    def step_state(self) -> dict:
        """Those per-step choices' state within an epoch, for a mid-epoch checkpoint (plain values)."""
        return {}

    def load_step_state(self, state: dict) -> None:
        """After `set_epoch`, where a mid-epoch checkpoint left the epoch's choices."""
