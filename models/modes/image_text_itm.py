"""Image-text matching (VLMo ITM): does this caption belong to this image, decided on the pooled
[CLS] of the fused pair (text and image tokens in one sequence, the vision-language expert in the
top layers). Each image is shown with its caption, with a hard negative caption and each caption
with a hard negative image: negatives are drawn from the softmax of the ITC similarities of the
whole global batch (gathered from every rank), never the pair itself. The draw uses one generator
seeded by (seed, step) on every rank, so all ranks agree on the global assignment and take their
own rows of it. The ITC head only scores candidates here (no gradient): it comes trained from an
image_text_itc stage (or a compound run); a fresh one makes the negatives random."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common import distributed as dist_util
from custom_datasets import batch as B
from models.backbone import VLMoBackbone
from models.heads import ITCHead, ITMHead, Pooler
from models.modes.base import ModeOptions, PretrainMode
from models.modes.image_text_itc import itc_embeddings


def hard_negatives(similarity: torch.Tensor, generator: torch.Generator,
                   same_caption: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`[N, N]` image-to-caption similarities (logits) -> (a caption index for each image, an image
    index for each caption), drawn with probability softmax(similarity) over every index but the
    item's own pair and, with `same_caption` (`[N, N]` bool), pairs whose caption is word for word
    the positive's (a false negative); a row with nothing else left draws uniformly from the rest."""
    n = similarity.shape[0]
    if n < 2:
        raise ValueError("image-text matching needs at least 2 pairs in the global batch to draw a negative")
    own = torch.eye(n, dtype=torch.bool, device=similarity.device)
    excluded = own if same_caption is None else own | same_caption

    def draw(logits: torch.Tensor) -> torch.Tensor:
        weights = logits.float().softmax(1).clamp_min(1e-12).masked_fill(excluded, 0.0)
        empty = weights.sum(1) == 0
        weights[empty] = (~own[empty]).float()
        return torch.multinomial(weights.cpu(), 1, generator=generator).squeeze(1).to(similarity.device)

    return draw(similarity), draw(similarity.t())


def same_captions(input_ids: torch.Tensor) -> torch.Tensor:
    """`[N, L]` token ids -> `[N, N]` True where two captions are identical (a polynomial hash of
    each row, so memory stays N x N)."""
    powers = torch.arange(input_ids.shape[1], device=input_ids.device, dtype=torch.int64)
    hashes = (input_ids.long() * (1_000_003 ** powers % (2 ** 61 - 1))).sum(1)
    return hashes[:, None] == hashes[None, :]


def draw_negatives(backbone: VLMoBackbone, itc_head: ITCHead, batch: dict[str, torch.Tensor], gather,
                   generator: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, tuple]:
    """(the gathered batch, this rank's negative caption index per image and negative image index
    per caption, indices into the gathered batch; the global assignment)."""
    keys = (B.IMAGE, B.INPUT_IDS, B.ATTENTION_MASK)
    with torch.no_grad():
        image_emb, text_emb = itc_embeddings(backbone, itc_head, batch)
        similarity = itc_head.scale() * gather(image_emb) @ gather(text_emb).t()  # [N, N]
        every = {k: gather(batch[k]) for k in keys}
    text_for_image, image_for_text = hard_negatives(similarity, generator, same_captions(every[B.INPUT_IDS]))
    local = len(batch[B.IMAGE])
    rank = 0 if len(every[B.IMAGE]) == local else dist_util.rank()
    rows = slice(rank * local, (rank + 1) * local)
    return every, text_for_image[rows], image_for_text[rows], (text_for_image, image_for_text)


def matching_outputs(backbone: VLMoBackbone, itc_head: ITCHead, pooler: Pooler, itm_head: ITMHead,
                     batch: dict[str, torch.Tensor], gather, generator: torch.Generator) -> dict:
    """The ITM loss and accuracy over each pair, its hard negative caption and its hard negative
    image (1:2, as VLMo), and the global negative assignment ("negatives")."""
    every, negative_text, negative_image, negatives = draw_negatives(backbone, itc_head, batch, gather, generator)
    images, ids, mask = batch[B.IMAGE], batch[B.INPUT_IDS], batch[B.ATTENTION_MASK]
    pair_images = torch.cat([images, images, every[B.IMAGE][negative_image]])  # [3B, 3, H, W]
    pair_ids = torch.cat([ids, every[B.INPUT_IDS][negative_text], ids])  # [3B, L]
    pair_mask = torch.cat([mask, every[B.ATTENTION_MASK][negative_text], mask])
    logits = itm_logits(backbone, pooler, itm_head, pair_images, pair_ids, pair_mask)  # [3B, 2]
    labels = torch.cat([torch.ones(len(images)), torch.zeros(2 * len(images))]).long().to(logits.device)
    return {"loss_itm": F.cross_entropy(logits, labels), "acc_itm": (logits.argmax(1) == labels).float().mean(),
            "negatives": negatives}


def itm_logits(backbone: VLMoBackbone, pooler: Pooler, itm_head: ITMHead, images: torch.Tensor, ids: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    """`[B, 2]` no-match / match logits of image-caption pairs, from the pooled fused [CLS]."""
    return itm_head(pooler(backbone.encode_pair(images, ids, mask))).float()


class ImageTextITM(PretrainMode):
    name = "image_text_itm"
    description = "image-text matching on the fused pair with hard negatives from ITC similarities (VLMo)"
    batch_keys = (B.IMAGE, B.INPUT_IDS, B.ATTENTION_MASK)
    data_kind = "pair"
    paths = frozenset({"image", "text", "pair"})
    heads = ("itc_head", "pooler", "itm_head")
    reads = frozenset({"image_views", "text", "itc", "pairs"})

    def __init__(self, backbone: VLMoBackbone, options: ModeOptions | None = None) -> None:
        super().__init__(backbone, options)
        dim = backbone.cfg.embed_dim
        self.itc_head, self.pooler, self.itm_head = ITCHead(dim), Pooler(dim), ITMHead(dim)
        self.steps = 0
        self.last_negatives: tuple[torch.Tensor, torch.Tensor] | None = None  # global assignment, for tests

    def frozen_parameter_names(self) -> list[str]:
        """The ITC head only ranks candidates (no gradient ever reaches it)."""
        return super().frozen_parameter_names() + [n for n, _ in self.named_parameters() if n.startswith("itc_head.")]

    def set_epoch(self, epoch: int) -> None:
        self.steps = epoch * 1_000_003  # distinct draws per epoch, the same on every rank

    def step_state(self) -> dict:
        return {"steps": self.steps}

    def load_step_state(self, state: dict) -> None:
        self.steps = int(state["steps"])

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_batch(batch)
        if self.training:
            self.steps += 1
        generator = torch.Generator().manual_seed(self.options.seed * 7919 + self.steps)
        out = matching_outputs(self.backbone, self.itc_head, self.pooler, self.itm_head, batch, self.options.gather,
                               generator)
        self.last_negatives = out.pop("negatives")
        return {"loss": out["loss_itm"], "loss_itm": out["loss_itm"].detach(), "acc_itm": out["acc_itm"]}
