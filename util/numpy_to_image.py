"""Convert a folder of `.npy` tiles to PNG images (the pretraining loader also reads .npy directly).

    python util/numpy_to_image.py generated_tiles/ tiles_png/ [--bands 3,2,1]

Any layout (HWC/CHW), dtype (uint8/uint16/float) and band count; non-8-bit data is scaled by
per-band percentiles of the whole folder. Unreadable files are reported and skipped.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.errors import UserError, cli_entry  # noqa: E402
from custom_datasets.image_io import BandScaler, open_tile_rgb  # noqa: E402
from custom_datasets.sources.image_folder import parse_bands  # noqa: E402


@cli_entry
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src_dir")
    p.add_argument("dst_dir")
    p.add_argument("--bands", default=None)
    args = p.parse_args(argv)
    src, dst = Path(args.src_dir), Path(args.dst_dir)
    if not src.is_dir():
        raise UserError(f"{src} is not a folder")
    files = sorted(src.rglob("*.npy"))
    if not files:
        raise UserError(f"{src} holds no .npy files")
    bands = parse_bands(args.bands)
    scaler = BandScaler.fit(files, bands)
    written, bad = 0, 0
    for path in files:
        target = dst / path.relative_to(src).with_suffix(".png")
        if target.exists():
            raise UserError(f"{target} already exists; choose an empty DST_DIR (nothing is overwritten)")
        try:
            image = open_tile_rgb(path, bands, scaler)
        except (ValueError, OSError) as err:
            print(f"skipped {path}: {err}")
            bad += 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target)
        written += 1
    print(f"wrote {written} images to {dst}" + (f"; skipped {bad} unreadable files" if bad else ""))


if __name__ == "__main__":
    main()
