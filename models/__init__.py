"""Model code: the shared backbone, its registry and heads. Imports no training code."""
from __future__ import annotations

from typing import Any

from models.backbone import VLMoBackbone
from models.config import BackboneConfig
from models.heads import MIMHead
from models.layers import Modality
from models.registry import BACKBONE_VARIANTS, list_models, variant_config


def create_model(name: str | None, pretrained: str | None = None, checkpoint: Any = None,
                 **overrides: Any) -> VLMoBackbone:
    """Build a registered backbone variant (field overrides such as `img_size=384` allowed) and,
    with `pretrained`, load a converted checkpoint into it, failing on any missing or unexpected
    weight. `name=None` rebuilds whatever architecture the checkpoint was saved with. `checkpoint`:
    the already read `Checkpoint` of `pretrained`, so callers that need it too read the file once."""
    from common.errors import UserError
    from models.pretrained import check_variant_fits, config_for_pretrained, load_backbone_weights

    if name is None and pretrained is None:
        raise UserError("create_model needs a model name or a pretrained checkpoint")
    try:
        cfg = variant_config(name, **overrides) if name is not None else None
    except KeyError as err:
        raise UserError(str(err.args[0])) from None
    except ValueError as err:
        raise UserError(f"invalid model settings for {name}: {err}") from None
    ckpt = None
    if pretrained is not None:
        # The checkpoint decides its weight layout (final norm, position kinds, eps); the name only
        # has to agree on sizes; overrides change run-time shape (image size, text length, drop path).
        saved, ckpt = config_for_pretrained(pretrained, {}, checkpoint)
        if name is not None:
            check_variant_fits(saved, name, cfg, pretrained)
        cfg, _ = config_for_pretrained(pretrained, overrides, ckpt)
    model = VLMoBackbone(cfg)
    if pretrained is not None:
        load_backbone_weights(model, pretrained, ckpt)
    return model

__all__ = ["BACKBONE_VARIANTS", "BackboneConfig", "MIMHead", "Modality", "VLMoBackbone", "create_model",
           "list_models", "variant_config"]
