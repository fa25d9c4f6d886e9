"""The forgetting chart: each held-out metric across the stages of a continual chain, one line per
run (e.g. λ = 0 against λ > 0), one panel per metric, drawn with PIL."""
from __future__ import annotations

import math

from PIL import Image, ImageDraw

from visualization.canvas import BACKGROUND, INK, font

COLOURS = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # one per line, up to 10
GRID_GREY = (225, 225, 225)


def _panel(title: str, stages: list[str], series: dict[str, list[float | None]], size: tuple[int, int],
           top_value: float = 1.0) -> Image.Image:
    w, h = size
    left, right, top, bottom = 44, 44, 26, 40
    panel = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(panel)
    draw.text((left, 4), title, fill=INK, font=font(14))

    def xy(stage: int, value: float) -> tuple[float, float]:
        x = left + (w - left - right) * (stage / max(1, len(stages) - 1))
        return x, top + (h - top - bottom) * (1 - value / top_value)

    for tick in (top_value * i / 4 for i in range(5)):
        y = xy(0, tick)[1]
        draw.line([(left, y), (w - right, y)], fill=GRID_GREY)
        draw.text((4, y - 7), f"{tick:.2f}", fill=INK, font=font(10))
    for s, name in enumerate(stages):
        x = xy(s, 0)[0]
        half = draw.textlength(name, font=font(10)) / 2
        draw.text((min(max(2, x - half), w - 2 * half - 2), h - bottom + 6), name, fill=INK, font=font(10))
    for colour, values in zip(COLOURS, series.values()):
        points = [xy(s, v) for s, v in enumerate(values) if v is not None]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    return panel


def stage_chart(stages: list[str], runs: dict[str, list[dict]], metrics: dict[str, str],
                panel_size: tuple[int, int] = (260, 220)) -> Image.Image:
    """`runs[name]` holds one report (metric -> value) per stage; a metric a stage did not measure is
    left out of its line. Axes run from 0 to 1, or to the next whole number above a larger value
    (losses)."""
    panels = []
    for key, label in metrics.items():
        series = {run: [r.get(key) for r in reports] for run, reports in runs.items()}
        largest = max((v for values in series.values() for v in values if v is not None), default=1.0)
        panels.append(_panel(label, stages, series, panel_size, max(1.0, float(math.ceil(largest)))))
    legend_height = 24
    canvas = Image.new("RGB", (panel_size[0] * len(panels), panel_size[1] + legend_height), BACKGROUND)
    for i, panel in enumerate(panels):
        canvas.paste(panel, (i * panel_size[0], legend_height))
    draw = ImageDraw.Draw(canvas)
    x = 40
    for colour, run in zip(COLOURS, runs):
        draw.rectangle([x, 8, x + 14, 18], fill=colour)
        draw.text((x + 20, 5), run, fill=INK, font=font(12))
        x += 30 + 8 * len(run)
    return canvas
