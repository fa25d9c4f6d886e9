"""BEiT masked image modeling: predict the visual token of every masked patch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.backbone import VLMoBackbone
from models.heads import MIMHead
from models.tasks.base import PretrainTask


class ImageMIM(PretrainTask):
    name = "image_mim"
    batch_keys = ("image", "bool_masked_pos", "visual_token_ids")
    needs_visual_tokens = True

    def __init__(self, backbone: VLMoBackbone, visual_vocab_size: int) -> None:
        super().__init__(backbone)
        self.mim_head = MIMHead(backbone.cfg.embed_dim, visual_vocab_size)

    def frozen_parameter_names(self) -> list[str]:
        """Image-only stage: the text path and the non-image experts get no gradient, so they stay frozen."""
        unused = ("backbone.text_embeddings.", "backbone.token_type_embeddings.", ".norm2_text.", ".mlp_text.",
                  ".norm2_vl.", ".mlp_vl.")
        return [n for n, _ in self.named_parameters() if any(u in n or n.startswith(u) for u in unused)]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_batch(batch)
        mask = batch["bool_masked_pos"].flatten(1).bool()  # [B, N]
        features = self.backbone.encode_image(batch["image"], mask)[:, 1:]  # [B, N, D]
        logits = self.mim_head(features[mask]).float()  # [M, V], only masked patches
        labels = batch["visual_token_ids"][mask]  # [M]
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, "loss_mim": loss.detach(), "acc_mim": acc}
