"""Tile grid geometry shared by tiled inference and dataset tiling, and the blending window.

One job: say where the tiles of a large image go. Along each axis, tiles of `tile` px start every
`stride` px from 0; the last tile is shifted inward to end exactly at the image border, so every
tile is full size and lies inside the image (no padded, invented pixels), and every pixel is
covered. Only an image smaller than one tile needs padding (`pad_to`). `core` bounds split the
axis into one disjoint interval per tile, cut half-way through each overlap: they partition the
image, and are what "context" stitching pastes. `window` is the smooth weight that "average"
stitching blends overlapping tiles with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from seg_mlops.errors import SegMlopsError


def starts(length: int, tile: int, stride: int, edge: str = "shift") -> list[int]:
    """Tile start positions along an axis of `length` px: 0, stride, 2*stride, ...

    Args:
        length: image size along the axis (px).
        tile: tile size along the axis (px).
        stride: distance between consecutive starts (1 <= stride <= tile keeps full coverage).
        edge: what happens where the regular steps do not end at the border: "shift" adds a last
            tile at length - tile (shifted inward: every tile full size and inside the image);
            "pad" adds a last regular tile that runs past the border (the image must be padded
            to starts[-1] + tile); "skip" drops it (the border strip is not covered; no tile at
            all when length < tile). With "shift" and "pad", an image shorter than one tile gets
            one tile at 0 (padded).
    """
    if length < 1 or tile < 1 or stride < 1:
        raise ValueError(f"length={length}, tile={tile}, stride={stride}: all must be >= 1")
    if edge == "skip":
        return list(range(0, length - tile + 1, stride))
    if length <= tile:
        return [0]
    regular = list(range(0, length - tile, stride))
    if edge == "shift":
        return regular + [length - tile]
    if edge == "pad":
        return regular + [regular[-1] + stride] if regular[-1] + tile < length else regular
    raise ValueError(f"edge={edge!r}: expected shift, pad or skip")


def core_bounds(positions: list[int], tile: int, length: int) -> list[int]:
    """Boundaries b_0=0 < b_1 < ... < b_n=length (shift, pad): tile i owns [b_i, b_{i+1}). Each inner boundary
    sits half-way through the overlap of tiles i-1 and i, so each owns the pixels farthest
    from its own border (the most context).

    Args:
        positions: the tile starts (from `starts`).
        tile: tile size along the axis.
        length: image size along the axis.
    """
    if not positions:
        return []
    inner = [(prev + tile + cur) // 2 for prev, cur in zip(positions, positions[1:])]
    return [positions[0], *inner, min(length, positions[-1] + tile)]  # < length only with edge="skip"


@dataclass(frozen=True)
class Tile:
    """One tile: its grid cell (row, col), its window [y, y+h) x [x, x+w) in the (padded) image,
    and the core [cy0, cy1) x [cx0, cx1) it owns, in image coordinates."""

    row: int
    col: int
    y: int
    x: int
    h: int
    w: int
    cy0: int
    cy1: int
    cx0: int
    cx1: int


@dataclass(frozen=True)
class Grid:
    """The tiles of a height x width image, row-major (sorted by row, then column)."""

    height: int
    width: int
    tile: tuple[int, int]  # (h, w) of every tile
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def rows(self) -> int:
        return len(self.ys)

    @property
    def cols(self) -> int:
        return len(self.xs)

    @property
    def padded(self) -> tuple[int, int]:
        """(height, width) the image needs so that every tile lies inside it: larger than the
        image only where it is smaller than one tile, or with edge="pad"."""
        return (max(self.height, self.ys[-1] + self.tile[0] if self.ys else 0),
                max(self.width, self.xs[-1] + self.tile[1] if self.xs else 0))

    def __len__(self) -> int:
        return self.rows * self.cols

    def __iter__(self) -> Iterator[Tile]:
        th, tw = self.tile
        by = core_bounds(list(self.ys), th, self.height)
        bx = core_bounds(list(self.xs), tw, self.width)
        for r, y in enumerate(self.ys):
            for c, x in enumerate(self.xs):
                yield Tile(r, c, y, x, th, tw, by[r], by[r + 1], bx[c], bx[c + 1])


def make_grid(height: int, width: int, tile: tuple[int, int], stride: tuple[int, int],
              edge: str = "shift") -> Grid:
    """The grid of `tile`-sized tiles every `stride` px over a height x width image.

    Args:
        height, width: image size (px).
        tile: (h, w) of a tile.
        stride: (dy, dx) between tile starts; 1 <= stride <= tile.
        edge: "shift", "pad" or "skip" (see `starts`).
    """
    return Grid(height, width, tuple(tile), tuple(starts(height, tile[0], stride[0], edge)),
                tuple(starts(width, tile[1], stride[1], edge)))


def overlap_grid(height: int, width: int, tile: tuple[int, int], overlap: int,
                 key: str = "tiled_infer.overlap") -> Grid:
    """Grid where each tile reaches `overlap` px into each neighbour's core: neighbouring tiles
    share 2 * overlap px (more at the border, where the last tile is shifted inward).

    Args:
        height, width: image size (px).
        tile: (h, w) of a tile.
        overlap: px of context on each side; must leave a stride of at least 1 px.
        key: config key named in the error when the overlap is too large.
    """
    if 2 * overlap >= min(tile):
        raise SegMlopsError(f"{key}={overlap}: must be below half the tile ({min(tile)} px), "
                            f"i.e. at most {(min(tile) - 1) // 2} (e.g. --set {key}={min(tile) // 8})")
    return make_grid(height, width, tile, (tile[0] - 2 * overlap, tile[1] - 2 * overlap))


def pad_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """`image` padded at the bottom/right to at least height x width by mirroring its edge pixels
    (symmetric: works for any size, even 1 px), so a too-small image still fills a tile."""
    dy, dx = max(0, height - image.shape[0]), max(0, width - image.shape[1])
    if not dy and not dx:
        return image
    pad = [(0, dy), (0, dx)] + [(0, 0)] * (image.ndim - 2)
    return np.pad(image, pad, mode="symmetric")


def window(height: int, width: int, floor: float = 1e-3) -> np.ndarray:
    """2-D Hann window (height, width), float32, at least `floor` everywhere.

    Blending overlapping tiles by these weights (then dividing by the summed weights) fades each
    tile out towards its border, where the model saw the least context; the floor keeps image
    borders, covered only by tile edges, weighted and avoids dividing by zero.
    """
    def hann(n: int) -> np.ndarray:
        return np.hanning(n + 2)[1:-1]  # drop the two zero end points of numpy's window

    return np.maximum(np.outer(hann(height), hann(width)), floor).astype(np.float32)
