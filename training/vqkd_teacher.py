"""The teacher whose patch features a VQ-KD tokenizer learns to reconstruct: any backbone this
project loads (a checkpoint of any stage, e.g. the image-text stage's image encoder, which is
CLIP-like; converted BEiT weights; whatever `--finetune` reads) or a BEiT in unilm, timm or Hugging
Face layout (converted in memory), frozen. It sees the tokenizer's
images resized so that its patch grid equals the tokenizer's, normalised with its own recorded
mean and std; its features are the patch tokens of block `layer` (the last: after the final norm,
as BEiT v2 takes DINO's and CLIP's)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import UserError
from models import create_model
from models.backbone import VLMoBackbone
from models.checkpoints import read_model_checkpoint
from models.run_info import preprocessing
from serving.checkpoint import recorded_preprocessing


def beit_backbone(path: str | Path, grid: int) -> VLMoBackbone:
    """A BEiT in microsoft/unilm, timm or Hugging Face layout, converted in memory as
    util/convert_beit_ckpt.py would write it, at a `grid` x `grid` patch grid."""
    from conversion.beit import convert, infer_config, read_source, target_config

    src = read_source(path)
    src_cfg = infer_config(src, None)
    cfg = target_config(src_cfg, None, grid * src_cfg.patch_size, "shared", 8, 8)  # no text path is read
    tensors, _ = convert(src, src_cfg, cfg)
    backbone = VLMoBackbone(cfg)
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")})
    return backbone


def own_backbone(path: str | Path, ckpt, grid: int) -> VLMoBackbone:
    probe = create_model(None, pretrained=str(path), checkpoint=ckpt)
    size = grid * probe.cfg.patch_size
    return create_model(None, pretrained=str(path), checkpoint=ckpt, img_size=size) if size != probe.cfg.img_size else probe


class Teacher(nn.Module):
    def __init__(self, path: str | Path, grid: int, layer: int | None = None) -> None:
        super().__init__()
        if not Path(path).exists():
            raise UserError(f"--teacher {path} does not exist; pass a checkpoint of any stage or converted BEiT weights")
        ckpt = None if Path(path).is_dir() else read_model_checkpoint(str(path))
        ours = ckpt is not None and ckpt.backbone_config is not None
        self.backbone = own_backbone(path, ckpt, grid) if ours else beit_backbone(path, grid)
        size = self.backbone.cfg.img_size
        self.backbone.eval().requires_grad_(False)
        depth = len(self.backbone.blocks)
        self.layer = depth if layer is None else layer
        if not 1 <= self.layer <= depth:
            raise UserError(f"--teacher_layer {layer}: the teacher has blocks 1..{depth}")
        pre = recorded_preprocessing(ckpt, size, 1.0) if ours else preprocessing(size, 1.0, False)  # BEiT's 0.5 / 0.5
        self.register_buffer("mean", torch.tensor(pre["mean"]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(pre["std"]).view(1, -1, 1, 1))
        self.image_size, self.source = size, str(path)

    @property
    def dim(self) -> int:
        return self.backbone.cfg.embed_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, S, S]` pixels in [0, 1] -> `[B, grid*grid, D]` patch features."""
        x = images.float()
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        if self.layer == len(self.backbone.blocks):
            return self.backbone.encode_image(x)[:, 1:]
        return self.backbone.image_block_outputs(x, (self.layer - 1,))[0][:, 1:]

    def describe(self) -> dict:
        return {"teacher": self.source, "teacher_layer": self.layer, "teacher_dim": self.dim,
                "teacher_image_size": self.image_size}
