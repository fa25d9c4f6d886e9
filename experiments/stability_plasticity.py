"""The stability–plasticity picture of a continual benchmark: one point per method (mean over
seeds, with a bar of ± one std each way), what the last stage learned (x) against what the chain
kept of the earlier stages (y). Up and right is better; drawn with PIL."""
from __future__ import annotations

from PIL import Image, ImageDraw

from visualization.canvas import BACKGROUND, INK, font
from experiments.stage_chart import COLOURS, GRID_GREY


def stability_plasticity(points: dict[str, tuple[float, float, float, float]], x_label: str, y_label: str,
                         size: tuple[int, int] = (520, 420)) -> Image.Image:
    """`points[name] = (x, x_std, y, y_std)`."""
    w, h = size
    left, right, top, bottom = 56, 20, 20, 48
    xs = [p[0] - p[1] for p in points.values()] + [p[0] + p[1] for p in points.values()]
    ys = [p[2] - p[3] for p in points.values()] + [p[2] + p[3] for p in points.values()]
    x0, x1 = _range(xs)
    y0, y1 = _range(ys)
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)

    def xy(x: float, y: float) -> tuple[float, float]:
        return (left + (w - left - right) * (x - x0) / (x1 - x0), top + (h - top - bottom) * (1 - (y - y0) / (y1 - y0)))

    for i in range(5):
        gx, gy = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        draw.line([xy(gx, y0), xy(gx, y1)], fill=GRID_GREY)
        draw.line([xy(x0, gy), xy(x1, gy)], fill=GRID_GREY)
        draw.text((xy(gx, y0)[0] - 12, h - bottom + 4), f"{gx:.3f}", fill=INK, font=font(10))
        draw.text((4, xy(x0, gy)[1] - 6), f"{gy:.3f}", fill=INK, font=font(10))
    draw.text((left, h - 20), x_label, fill=INK, font=font(12))
    draw.text((left, 2), y_label, fill=INK, font=font(12))
    for colour, (name, (x, dx, y, dy)) in zip(COLOURS, points.items()):
        draw.line([xy(x - dx, y), xy(x + dx, y)], fill=colour, width=1)
        draw.line([xy(x, y - dy), xy(x, y + dy)], fill=colour, width=1)
        px, py = xy(x, y)
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        draw.text((px + 6, py - 14), name, fill=colour, font=font(12))
    return image


def _range(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    pad = max((high - low) * 0.1, 1e-3)
    return low - pad, high + pad
