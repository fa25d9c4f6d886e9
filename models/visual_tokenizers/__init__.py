"""Visual tokenizers: map the tokenizer view of an image to one target id per backbone patch.

`create_visual_tokenizer(kind, weight_path, image_size)` returns an object with
`get_codebook_indices(images) -> LongTensor[B, h*w]` and `vocab_size` (the names unilm uses).
Images come in as [0, 1] pixels at the tokenizer resolution (`--second_image_size`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from common.checkpoint_io import load_safetensors_file
from common.errors import UserError
from models.visual_tokenizers.dall_e import DalleEncoder, map_pixels
from models.visual_tokenizers.kmeans import KMeansTokenizer

KINDS = ("dall-e", "kmeans", "vqkd")


class DalleTokenizer(nn.Module):
    """DALL-E dVAE encoder as a tokenizer: argmax over the 8192 logits of each 8x8 pixel cell.
    Runs in bf16/fp16 autocast on GPUs that support it (as BEiT ran it in fp16), channels-last
    everywhere (1.17x faster on CPU with the same ids: experiments/benchmark.py --mode tokenizer)."""

    def __init__(self, encoder: DalleEncoder) -> None:
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        # decoder tensors a ContinualTransformer checkpoint carried with the encoder: they draw the
        # reconstruction pictures (not a submodule: training never moves or needs them)
        self.carried_decoder: dict[str, torch.Tensor] | None = None

    @property
    def vocab_size(self) -> int:
        return self.encoder.cfg.vocab_size

    compiled_parts_name = "encoder"

    def compiled_parts(self) -> list[nn.Module]:
        """What `--compile` compiles: the module get_codebook_indices calls."""
        return [self.encoder]

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        x = map_pixels(images.float()).contiguous(memory_format=torch.channels_last)
        dtype = torch.bfloat16 if x.is_cuda and torch.cuda.is_bf16_supported() else torch.float16
        with torch.autocast(x.device.type, dtype=dtype, enabled=x.is_cuda):
            logits = self.encoder(x)  # [B, V, h, w]
        return logits.argmax(1).flatten(1)  # [B, h*w]


def load_kmeans_tokenizer(path: str | Path) -> KMeansTokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / "visual_tokenizer.safetensors"
    if not path.is_file():
        raise UserError(f"--d_vae_weight_path {path} does not exist; fit one with "
                        f"python util/fit_visual_tokenizer.py --data_path DIR --output {path}")
    tensors, meta = load_safetensors_file(path)
    if meta.get("kind") != "kmeans" or "centroids" not in tensors:
        raise UserError(f"{path} is not a k-means visual tokenizer (made by util/fit_visual_tokenizer.py)")
    return KMeansTokenizer(tensors["centroids"], int(meta["grid"]))


def create_visual_tokenizer(kind: str, weight_path: str | Path | None, image_size: int,
                            expected_grid: int | None = None, carried_dall_e: dict | None = None) -> nn.Module:
    """Build the tokenizer and check that it yields one id per backbone patch. `carried_dall_e`:
    `{"encoder": tensors, "decoder": tensors}` already read (from a ContinualTransformer checkpoint),
    used when no path is given; the decoder only draws pictures."""
    if kind == "dall-e":
        from models.visual_tokenizers.dall_e_loader import encoder_from_tensors, load_dalle_encoder

        if weight_path is not None:
            tokenizer: nn.Module = DalleTokenizer(load_dalle_encoder(weight_path))
        elif carried_dall_e and carried_dall_e.get("encoder"):
            tokenizer = DalleTokenizer(encoder_from_tensors(carried_dall_e["encoder"], None,
                                                            "the checkpoint's DALL-E encoder"))
            tokenizer.carried_decoder = carried_dall_e.get("decoder")
        else:
            raise UserError("--d_vae_type dall-e needs --d_vae_weight_path DIR holding OpenAI's encoder.pkl")
        grid = image_size // 8
    elif kind == "kmeans":
        if weight_path is None:
            raise UserError("--d_vae_type kmeans needs --d_vae_weight_path FILE (or leave it out in main_pretrain_cook.py to fit one)")
        tokenizer = load_kmeans_tokenizer(weight_path)
        grid = tokenizer.grid
    elif kind == "vqkd":
        from models.visual_tokenizers.vqkd import load_vqkd_tokenizer

        if weight_path is None:
            raise UserError("--d_vae_type vqkd needs --d_vae_weight_path FILE (BEiT v2's vqkd_encoder_base_decoder_*.pth, "
                            "or one python util/train_vqkd.py wrote)")
        tokenizer = load_vqkd_tokenizer(weight_path)
        grid = image_size // tokenizer.patch_size
    else:
        raise UserError(f"--d_vae_type {kind} is unknown; choose one of {', '.join(KINDS)}")
    if expected_grid is not None and grid != expected_grid:
        if kind == "dall-e":  # one token per 8x8 pixels: the view size decides the grid
            fix = f"use --second_image_size {expected_grid * 8}"
        elif kind == "vqkd":  # one token per encoder patch: the view size decides the grid
            fix = f"use --second_image_size {expected_grid * tokenizer.patch_size}"
        else:  # the grid was fixed when the tokenizer was fitted
            fix = (f"fit a tokenizer for a {expected_grid}x{expected_grid} grid (util/fit_visual_tokenizer.py, or leave "
                   f"out --d_vae_weight_path to fit one in the run), or give the backbone {grid}x{grid} patches")
        raise UserError(f"the {kind} tokenizer {weight_path or ''} gives a {grid}x{grid} token grid at "
                        f"--second_image_size {image_size} but the backbone has {expected_grid}x{expected_grid} "
                        f"patches; {fix}")
    return tokenizer


def kmeans_metadata(grid: int, image_size: int, extra: dict | None = None) -> dict[str, str]:
    return {"kind": "kmeans", "grid": str(grid), "image_size": str(image_size), **{k: json.dumps(v) for k, v in (extra or {}).items()}}


def token_renderer(tokenizer: nn.Module, weight_path: str | Path | None, image_size: int):
    """A function drawing `[B, h*w]` visual token ids as `[B, C, S, S]` pixels in [0, 1]: k-means
    tokens as their centroid patches, DALL-E tokens through OpenAI's decoder when `decoder.pkl` lies
    beside `encoder.pkl` (or the checkpoint carried one); None when the tokens cannot be drawn."""
    if isinstance(tokenizer, KMeansTokenizer):
        return lambda ids: tokenizer.decode(ids, image_size)
    if isinstance(tokenizer, DalleTokenizer):
        from models.visual_tokenizers.dall_e_loader import decoder_from_tensors, load_dalle_decoder

        carried = tokenizer.carried_decoder
        decoder = load_dalle_decoder(weight_path) if weight_path else \
            decoder_from_tensors(carried, "the checkpoint's DALL-E decoder") if carried else None
        if decoder is not None:
            grid = image_size // 8
            return lambda ids: decoder.to(ids.device).decode(ids, grid)
    return None
