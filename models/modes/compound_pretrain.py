"""MIM + MLM + ITC on image-text pairs, each objective drawn per step with its own probability.
ITC is skipped on steps whose image was masked for MIM (ContinualTransformer's rule). With
`itm_conduct_prob` > 0, VLMo's image-text matching joins (its pooler and match head with it; its
hard negatives ranked by the ITC head). The draws come from one seeded generator per epoch, so
every rank draws the same objectives each step and no collective is left waiting; without ITM the
draws are exactly ContinualTransformer's three. With `fused_mlm`, the masked words are predicted
from the caption fused with its image (VLMo's MLM) rather than from the text alone."""
from __future__ import annotations

import random

import torch

from custom_datasets import batch as B
from models.backbone import VLMoBackbone
from models.heads import ITCHead, ITMHead, MIMHead, MLMHead, Pooler
from models.modes.base import ModeOptions, PretrainMode
from models.modes.image_mim import mim_loss
from models.modes.image_text_itc import contrastive_loss, itc_embeddings
from models.modes.image_text_itm import matching_outputs
from models.modes.image_text_mlm import fused_mlm_logits
from models.modes.text_mlm import loss_and_accuracy, mlm_loss


class CompoundPretrain(PretrainMode):
    name = "compound_pretrain"
    description = "MIM + MLM + ITC on pairs, each drawn per step with its --*_conduct_prob"
    batch_keys = (B.IMAGE, B.MASKED_PATCHES, B.VISUAL_TOKENS, B.INPUT_IDS, B.ATTENTION_MASK, B.MLM_INPUT_IDS,
                  B.MLM_LABELS)
    data_kind = "pair"
    paths = frozenset({"image", "masked_image", "text"})
    heads = ("mim_head", "mlm_head", "itc_head")
    needs_visual_tokens = True
    needs_mlm_masks = True
    reads = frozenset({"image_views", "masking", "visual_tokens", "text", "mlm", "itc", "pairs", "compound"})
    static_graph = False

    def __init__(self, backbone: VLMoBackbone, options: ModeOptions) -> None:
        super().__init__(backbone, options)
        if not options.visual_vocab_size:
            raise ValueError("compound_pretrain needs ModeOptions.visual_vocab_size")
        dim = backbone.cfg.embed_dim
        self.mim_head = MIMHead(dim, options.visual_vocab_size)
        self.mlm_head = MLMHead(dim, backbone.cfg.vocab_size, backbone.cfg.layer_norm_eps)
        self.itc_head = ITCHead(dim)
        if options.itm_conduct_prob > 0:  # the matching heads exist (and are saved) only when used
            self.pooler, self.itm_head = Pooler(dim), ITMHead(dim)
            self.heads, self.paths = self.heads + ("pooler", "itm_head"), self.paths | {"pair"}
        if options.fused_mlm:
            self.paths = self.paths | {"pair"}
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.draws = random.Random(f"{self.options.seed}:{epoch}")

    def step_state(self) -> dict:
        return {"draws": self.draws.getstate()}

    def load_step_state(self, state: dict) -> None:
        self.draws.setstate(state["draws"])

    def draw(self) -> tuple[bool, bool, bool, bool]:
        """(MIM, MLM, ITC, ITM) for this step; evaluation measures all of them."""
        o = self.options
        if not self.training:
            return True, True, True, o.itm_conduct_prob > 0
        mim, mlm, itc = (self.draws.random() < p for p in (o.mim_conduct_prob, o.mlm_conduct_prob, o.itc_conduct_prob))
        itm = o.itm_conduct_prob > 0 and self.draws.random() < o.itm_conduct_prob
        itc = itc and not mim
        if not (mim or mlm or itc or itm):  # a step always trains something
            itc = True
        return mim, mlm, itc, itm

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_batch(batch)
        do_mim, do_mlm, do_itc, do_itm = self.draw()
        out: dict[str, torch.Tensor] = {}
        losses = []
        if do_mim:
            loss, acc = mim_loss(self.backbone, self.mim_head, batch)
            losses.append(loss)
            out.update(loss_mim=loss.detach(), acc_mim=acc)
        if do_mlm:
            loss, acc = (loss_and_accuracy(*fused_mlm_logits(self.backbone, self.mlm_head, batch))
                         if self.options.fused_mlm else mlm_loss(self.backbone, self.mlm_head, batch))
            losses.append(loss)
            out.update(loss_mlm=loss.detach(), acc_mlm=acc)
        if do_itc:
            image_emb, text_emb = itc_embeddings(self.backbone, self.itc_head, batch)
            itc = contrastive_loss(image_emb, text_emb, self.itc_head.scale(), self.options.gather)
            losses.append(itc["loss_itc"])
            out.update({k: v.detach() for k, v in itc.items()})
        if do_itm:
            generator = torch.Generator().manual_seed(self.draws.getrandbits(62) if self.training else self.options.seed)
            itm = matching_outputs(self.backbone, self.itc_head, self.pooler, self.itm_head, batch, self.options.gather,
                                   generator)
            losses.append(itm["loss_itm"])
            out.update(loss_itm=itm["loss_itm"].detach(), acc_itm=itm["acc_itm"])
        return {"loss": torch.stack(losses).sum(), **out}
