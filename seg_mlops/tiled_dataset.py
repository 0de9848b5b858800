"""Dataset tiling (`seg-mlops make-tiles`): cut large image/mask pairs into tile pairs.

One job: write `<output>/images/<stem>_<row>x<col>.png` and the mask tile of the same name, cut at
the same positions (seg_mlops.tiling) from the files as stored. Tiles are plain crops, never
resampled, and written as PNG (lossless), so mask tiles hold exactly the source mask's values.
Optionally the whole pair is added downscaled (`<stem>_whole.png`: image with area averaging,
mask with nearest neighbour), as the reference's "mixed" tiled datasets do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from seg_mlops import data, tiling
from seg_mlops.data import IMAGE_SUFFIXES, check_same_size, decode_file, pair_files
from seg_mlops.errors import SegMlopsError

EDGES = ("shift", "pad", "skip")


@dataclass(frozen=True)
class TilingReport:
    pairs: int  # source pairs read
    tiles: int  # tile pairs written (whole pairs not counted)
    wholes: int  # downscaled whole pairs written
    skipped: int  # source pairs that gave no tile (edge="skip" and smaller than one tile)


def _prepare(output: Path, overwrite: bool) -> tuple[Path, Path]:
    """<output>/images and <output>/masks, empty. With overwrite, the image files left there by a
    previous run are removed (stale tiles of another tile size would silently join the dataset)."""
    folders = (output / "images", output / "masks")
    existing = [p for folder in folders if folder.is_dir() for p in folder.iterdir()]
    if existing and not overwrite:
        raise SegMlopsError(f"{output} already holds {len(existing)} files in images/ or masks/; "
                            "pass --overwrite to replace them, or choose another --output")
    other = [p for p in existing if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES]
    if other:
        raise SegMlopsError(f"{other[0]} is not an image file; --overwrite only replaces images: "
                            "move it out or choose another --output")
    for path in existing:
        path.unlink()
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    return folders


def make_tiles(images_dir: str | Path, masks_dir: str | Path, output: str | Path, *, tile: int,
               overlap: int = 0, whole: int = 0, edge: str = "shift", overwrite: bool = False) -> TilingReport:
    """Cut every image/mask pair (paired by file stem) into tile x tile pairs.

    Args:
        images_dir, masks_dir: the large images and their masks (same size per pair).
        output: writes <output>/images and <output>/masks.
        tile: tile side in px.
        overlap: px shared by neighbouring tiles (stride = tile - overlap).
        whole: if > 0, also write each pair resized to whole x whole as `<stem>_whole.png`.
        edge: where the regular steps miss the border: "shift" moves the last tile inward (every
            tile full size, all pixels covered), "pad" adds a last tile padded with black image
            and background (0) mask, "skip" leaves the border strip out.
        overwrite: replace the images of a non-empty output (else it is an error).
    """
    if tile < 1:
        raise SegMlopsError(f"--tile {tile}: must be >= 1")
    if not 0 <= overlap < tile:
        raise SegMlopsError(f"--overlap {overlap}: must be >= 0 and below --tile {tile}")
    if edge not in EDGES:
        raise SegMlopsError(f"--edge {edge}: must be one of {', '.join(EDGES)}")
    pairs = pair_files(images_dir, masks_dir)
    images_out, masks_out = _prepare(Path(output), overwrite)
    tiles = wholes = skipped = 0
    for pair in pairs:
        image, mask = decode_file(pair.image), decode_file(pair.mask)
        check_same_size(image, mask, pair)
        height, width = image.shape[:2]
        grid = tiling.make_grid(height, width, (tile, tile), (tile - overlap, tile - overlap), edge)
        if len(grid) == 0:
            skipped += 1
        # Zero padding (black image, background mask) only for edge="pad" or images smaller than a
        # tile; the labels of padded pixels are honest: nothing is there.
        ph, pw = grid.padded
        pad = ((0, ph - height), (0, pw - width))
        image = np.pad(image, pad + ((0, 0),) * (image.ndim - 2))
        mask = np.pad(mask, pad + ((0, 0),) * (mask.ndim - 2))
        digits = max(2, len(str(max(grid.rows, grid.cols) - 1)))
        for t in grid:
            name = f"{pair.image.stem}_{t.row:0{digits}d}x{t.col:0{digits}d}.png"
            data.write_file(images_out / name, image[t.y:t.y + tile, t.x:t.x + tile])
            data.write_file(masks_out / name, mask[t.y:t.y + tile, t.x:t.x + tile])
            tiles += 1
        if whole:
            name = f"{pair.image.stem}_whole.png"
            data.write_file(images_out / name, cv2.resize(image[:height, :width], (whole, whole), interpolation=cv2.INTER_AREA))
            data.write_file(masks_out / name, cv2.resize(mask[:height, :width], (whole, whole), interpolation=cv2.INTER_NEAREST))
            wholes += 1
    return TilingReport(len(pairs), tiles, wholes, skipped)
