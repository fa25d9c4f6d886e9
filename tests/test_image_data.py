"""Image folders and tiles: every format users have is read as RGB; bad files are skipped."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from common.errors import UserError
from custom_datasets.collate import collate_skipping_bad
from custom_datasets.image_folder import ImageFiles
from custom_datasets.image_io import open_tile_rgb, read_tile, to_hwc
from tests.helpers import SHARED_DATA, requires_shared


def _identity(image, key=None):
    return {"size": image.size, "mode": image.mode}


def _write_zoo(root):
    (root / "a").mkdir(parents=True)
    Image.new("RGB", (20, 10), (255, 0, 0)).save(root / "a" / "rgb.jpg")
    Image.new("L", (8, 8), 100).save(root / "a" / "gray.png")
    Image.new("RGBA", (8, 8), (0, 0, 255, 10)).save(root / "a" / "rgba.png")
    Image.new("P", (8, 8), 3).save(root / "a" / "palette.gif")
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(root / "a" / "deep16.png")
    np.save(root / "a" / "tile.npy", np.random.default_rng(0).integers(0, 30000, (3, 8, 8), dtype=np.uint16))
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "a" / "notes.jpg").write_text("not an image")
    good = (root / "a" / "rgb.jpg").read_bytes()
    (root / "a" / "truncated.jpg").write_bytes(good[: len(good) // 3])


def test_every_readable_format_becomes_rgb_and_bad_files_are_counted(tmp_path):
    _write_zoo(tmp_path)
    data = ImageFiles(tmp_path, _identity)
    samples = [data[i] for i in range(len(data))]
    good = [s for s in samples if s is not None]
    assert all(s["mode"] == "RGB" for s in good)
    assert len(good) in (6, 7)  # six good files; a 1/3-truncated JPEG may still decode partially
    batch = collate_skipping_bad(samples)
    assert int(batch["num_skipped"]) == len(samples) - len(good) >= 2
    assert data.class_to_idx == {"a": 0} and good[0]["label"] == 0


def test_folder_without_usable_images_is_one_clear_error(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"")
    (tmp_path / "y.png").write_text("nope")
    with pytest.raises(UserError, match="none of the first 2 image files could be read"):
        ImageFiles(tmp_path, _identity)
    with pytest.raises(UserError, match="holds no image files"):
        ImageFiles(_empty(tmp_path), _identity)
    with pytest.raises(UserError, match="does not exist"):
        ImageFiles(tmp_path / "missing", _identity)


def _empty(tmp_path):
    path = tmp_path / "empty_dir"
    path.mkdir()
    return path


def test_tile_layouts_and_bands(tmp_path):
    chw = np.zeros((4, 16, 16), dtype=np.uint8)
    chw[3] = 200  # NIR band
    assert to_hwc(chw).shape == (16, 16, 4)
    np.save(tmp_path / "t.npy", chw)
    assert read_tile(tmp_path / "t.npy", [3, 3, 3])[0, 0].tolist() == [200, 200, 200]
    with pytest.raises(ValueError, match="has 4 bands"):
        read_tile(tmp_path / "t.npy", [0, 1, 7])
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError):
        read_tile(tmp_path / "obj.npy", None)  # object arrays would need pickle: refused


@requires_shared
@pytest.mark.parametrize("folder, bands", [("rgb_uint16_hwc", None), ("rgbn_uint8_chw", [0, 1, 2])])
def test_real_landsat_tiles(folder, bands):
    data = ImageFiles(SHARED_DATA / "landsat_tiles" / folder, lambda im, key=None: {"array": np.asarray(im)}, bands)
    arrays = [data[i]["array"] for i in range(8)]
    assert all(a.shape == (128, 128, 3) and a.dtype == np.uint8 for a in arrays)
    stacked = np.stack(arrays)
    assert stacked.std() > 20 and 30 < stacked.mean() < 225  # percentile scaling spreads the 16-bit range
    if folder == "rgb_uint16_hwc":
        assert data.scaler is not None and (data.scaler.high > 1000).all()
        assert open_tile_rgb(data.path(0), None, data.scaler).mode == "RGB"
