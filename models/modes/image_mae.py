"""MAE (He et al., 2021): the backbone's own blocks encode only the visible patches (a quarter of
them at the default --mask_ratio 0.75), and a light decoder reconstructs the pixels of the masked
ones (normalised per patch with --norm_pix_loss). No tokenizer, and about a quarter of BEiT's
encoder work per image. What the stage learns is the backbone later stages and fine-tuning use."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from common.errors import UserError
from custom_datasets import batch as B
from models.backbone import VLMoBackbone
from models.mae_decoder import MAEDecoder, masked_mse, pixel_targets
from models.modes.base import ModeOptions, PretrainMode


@dataclass(frozen=True)
class MAEShape:
    """The decoder and the objective: MAE's `decoder_*` settings (None: `decoder_defaults`), the mask
    ratio, pixel targets."""

    decoder_embed_dim: int | None = None
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True


def decoder_defaults(embed_dim: int, depth: int) -> tuple[int, int, int]:
    """(width, blocks, heads) of the decoder: MAE's 512 x 8 x 16 for ViT-base and larger; for a
    smaller encoder half its width, a quarter of its blocks and 32 dims a head, so the decoder stays
    light next to the encoder it serves."""
    if embed_dim >= 768:
        return 512, 8, 16
    width = embed_dim // 2
    return width, max(1, depth // 4), max(1, width // 32)


def visible_patches(mask: torch.Tensor) -> torch.Tensor:
    """`[B, N]` True where masked -> `[B, K]` indices of the visible patches, in order (every image
    must keep the same number, as MAE's masks do)."""
    kept = (~mask).sum(1)
    if kept.numel() and not bool((kept == kept[0]).all()):
        raise ValueError(f"MAE masks keep the same number of patches in every image; got {sorted(set(kept.tolist()))}")
    return (~mask).nonzero()[:, 1].view(mask.shape[0], -1)  # nonzero is row-major: each row's ascending


def mae_outputs(backbone: VLMoBackbone, decoder: MAEDecoder, images: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel predictions `[B, N, p*p*C]`, targets of the same shape) for images with `mask` `[B, N]`."""
    visible = visible_patches(mask)
    prediction = decoder(backbone.encode_visible(images, visible), visible)
    return prediction, pixel_targets(images, backbone.cfg.patch_size, decoder.norm_pix_loss)


class ImageMAE(PretrainMode):
    name = "image_mae"
    description = "MAE: the encoder sees only the visible patches, a light decoder reconstructs the masked pixels"
    batch_keys = (B.IMAGE, B.MASKED_PATCHES)
    data_kind = "image"
    paths = frozenset({"image"})
    heads = ("mae_decoder",)
    reads = frozenset({"image_views", "mae"})
    image_masks = "mae"
    # MAE's main_pretrain.py: crops of at least a fifth of the image and flips only (no colour jitter),
    # AdamW betas (0.9, 0.95)
    flag_defaults = {"min_crop_scale": 0.2, "color_jitter": 0.0, "opt_betas": [0.9, 0.95]}

    def __init__(self, backbone: VLMoBackbone, options: ModeOptions) -> None:
        super().__init__(backbone, options)
        shape = options.mae or MAEShape()
        cfg = backbone.cfg
        width, depth, heads = decoder_defaults(cfg.embed_dim, cfg.depth)
        width, heads = shape.decoder_embed_dim or width, shape.decoder_num_heads or heads
        if width % heads:
            raise UserError(f"--decoder_embed_dim {width} is not a multiple of --decoder_num_heads {heads}; give a width "
                            f"each head can take an equal share of")
        self.mae_decoder = MAEDecoder(cfg.embed_dim, width, shape.decoder_depth or depth,
                                      heads, cfg.patch_size, cfg.grid_size, cfg.in_chans,
                                      cfg.layer_norm_eps, mask_ratio=shape.mask_ratio,
                                      norm_pix_loss=shape.norm_pix_loss)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_batch(batch)
        mask = batch[B.MASKED_PATCHES].flatten(1).bool()  # [B, N]
        prediction, target = mae_outputs(self.backbone, self.mae_decoder, batch[B.IMAGE], mask)
        loss = masked_mse(prediction, target, mask)
        return {"loss": loss, "loss_mae": loss.detach()}
