"""What MAE sees and reconstructs, as a picture: for each held-out image, the input, what the
encoder sees (masked patches as a checkerboard), the reconstruction (visible patches as they were,
masked ones as predicted) and the decoder's prediction of every patch. Predictions of normalised
pixels (--norm_pix_loss) are drawn with each patch's own mean and variance put back, as MAE's
visualisations of such models do."""
from __future__ import annotations

import torch
from PIL import Image

from models.mae_decoder import patchify, unpatchify
from models.modes.image_mae import mae_outputs
from visualization.canvas import grid, to_rgb
from visualization.mim_pictures import checkerboard, patch_mask_pixels

COLUMNS = ["input", "masked", "reconstruction", "prediction"]


def as_pixels(prediction: torch.Tensor, images: torch.Tensor, patch: int, norm_pix: bool) -> torch.Tensor:
    """Predicted patches `[B, N, p*p*C]` as images in the inputs' normalised space."""
    if norm_pix:
        target = patchify(images.float(), patch)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        prediction = prediction * (var + 1e-6) ** 0.5 + mean
    side = images.shape[-1] // patch
    return unpatchify(prediction.float(), patch, (side, side), images.shape[1])


@torch.no_grad()
def mae_reconstruction(backbone, decoder, images: torch.Tensor, mask: torch.Tensor,
                       mean_std: tuple[tuple[float, ...], tuple[float, ...]]) -> dict[str, torch.Tensor]:
    """The four columns as `[B, C, S, S]` pixels in [0, 1]; `images` normalised with `mean_std`,
    `mask` `[B, N]` True where masked."""
    prediction, _ = mae_outputs(backbone, decoder, images, mask)
    patch = backbone.cfg.patch_size
    predicted = as_pixels(prediction, images, patch, decoder.norm_pix_loss)
    mean = torch.tensor(mean_std[0], device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(mean_std[1], device=images.device).view(1, -1, 1, 1)

    def shown(x: torch.Tensor) -> torch.Tensor:
        return (x.float() * std + mean).clamp(0, 1)

    side = images.shape[-1] // patch
    where = patch_mask_pixels(mask, (side, side), images.shape[-1]).to(images.device)
    pixels = shown(images)
    return {"input": pixels, "masked": torch.where(where, checkerboard(pixels), pixels),
            "reconstruction": torch.where(where, shown(predicted), pixels), "prediction": shown(predicted)}


def mae_picture(columns: dict[str, torch.Tensor], rows: int = 8, min_cell: int = 128) -> Image.Image:
    size = columns["input"].shape[-1]
    scale = max(1, -(-min_cell // size))
    count = min(rows, columns["input"].shape[0])
    return grid([[to_rgb(columns[name][i], scale) for name in COLUMNS] for i in range(count)], COLUMNS)
