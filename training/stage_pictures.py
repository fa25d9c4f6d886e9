"""The pictures at the end of a stage, from the same held-out probes as the stage report:
`pictures/mim_reconstructions.png` (what MIM sees and predicts), `pictures/mae_reconstructions.png`
(what MAE sees and reconstructs) and `pictures/retrieval_examples.png`
(captions and the images the model finds for them), each also written to TensorBoard."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from common.console import say
from custom_datasets import batch as B
from custom_datasets.transforms import mean_std
from models.visual_tokenizers import token_renderer
from training.batch import ALL_TENSOR_KEYS, BatchPreparer
from visualization.canvas import save_picture
from visualization.mae_pictures import mae_picture, mae_reconstruction
from visualization.mim_pictures import mim_reconstruction, reconstruction_picture
from visualization.retrieval_pictures import captions_and_images, retrieval_picture, top_images

ROWS = 8
QUERIES, TOP_K = 4, 5


def mim_picture(backbone, head, probe, tokenizer, tok_settings, grid: tuple[int, int], device) -> Any | None:
    render = token_renderer(tokenizer, tok_settings.d_vae_weight_path, tok_settings.second_image_size)
    if render is None:
        say("pictures: no MIM reconstructions (visual tokens are drawn through k-means centroids, or through the "
            "DALL-E decoder when decoder.pkl lies beside encoder.pkl in --d_vae_weight_path)")
        return None
    dataset, collate = probe
    prepare = BatchPreparer(device, ALL_TENSOR_KEYS, tokenizer, keep_tokenizer_image=True)
    batch = next(prepare.batches(DataLoader(dataset, batch_size=ROWS, collate_fn=collate)), None)
    if batch is None or B.VISUAL_TOKENS not in batch:
        return None
    return reconstruction_picture(mim_reconstruction(backbone, head, batch, render, grid), ROWS)


def mae_picture_of(backbone, decoder, probe, imagenet_norm: bool, seed: int, device) -> Any | None:
    """The first held-out images, masked as the stage report masks them, and their reconstructions."""
    from training.stage_eval import mae_masks

    dataset, collate = probe
    prepare = BatchPreparer(device, ALL_TENSOR_KEYS)
    batch = next(prepare.batches(DataLoader(dataset, batch_size=ROWS, collate_fn=collate)), None)
    if batch is None:
        return None
    images = batch[B.IMAGE]
    mask = mae_masks(len(images), 0, decoder.grid, decoder.mask_ratio, seed).to(images.device)
    return mae_picture(mae_reconstruction(backbone, decoder, images, mask, mean_std(imagenet_norm)), ROWS)


def first_caption_of_each_image(owner: torch.Tensor, count: int) -> list[int]:
    firsts: dict[int, int] = {}
    for j, image in enumerate(owner.tolist()):
        firsts.setdefault(image, j)
    return [firsts[i] for i in sorted(firsts)[:count]]


def retrieval_examples(pair_scores: tuple[torch.Tensor, torch.Tensor], dataset, imagenet_norm: bool) -> Any:
    """`pair_scores`: the stage report's (similarity, owner) of the same held-out pairs."""
    similarity, owner = pair_scores
    queries = first_caption_of_each_image(owner.cpu(), QUERIES)
    wanted = set(top_images(similarity, queries, TOP_K).flatten().tolist())
    captions, pixels = captions_and_images(dataset, wanted, *mean_std(imagenet_norm))
    return retrieval_picture(similarity, owner, captions, pixels, queries, TOP_K)


@torch.no_grad()
def write_stage_pictures(run, heads: dict, probes, visual_tokenizer, pair_scores=None, writer=None,
                         step: int = 0) -> list[Path]:
    """Draw what this stage's heads and probes allow (retrieval from the stage report's `pair_scores`);
    returns the files written."""
    cfg, folder = run.cfg, run.ctx.output_dir / "pictures"
    was_training = run.backbone.training
    run.backbone.eval()
    pictures = {}
    if "mim_head" in heads and probes.images is not None and visual_tokenizer is not None:
        pictures["mim_reconstructions"] = mim_picture(run.backbone, heads["mim_head"], probes.images, visual_tokenizer,
                                                      cfg.visual_tokenizer, run.grid, run.ctx.device)
    if "mae_decoder" in heads and probes.images is not None:
        pictures["mae_reconstructions"] = mae_picture_of(run.backbone, heads["mae_decoder"], probes.images,
                                                         cfg.views.imagenet_default_mean_and_std, cfg.run.seed,
                                                         run.ctx.device)
    if pair_scores is not None:
        pictures["retrieval_examples"] = retrieval_examples(pair_scores, probes.pairs[0],
                                                            cfg.views.imagenet_default_mean_and_std)
    run.backbone.train(was_training)
    if not run.ctx.is_main:  # a sharded run draws on every rank (each forward needs all); rank 0 writes
        return []
    written = [save_picture(image, folder / f"{name}.png", writer, f"pictures/{name}", step)
               for name, image in pictures.items() if image is not None]
    if written:
        say("pictures: " + ", ".join(str(p) for p in written))
    return written
