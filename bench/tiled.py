"""Benchmark of tiled inference on the 2048x1536 Tiled-Cervical-Cancer images: is cutting and
stitching cheap next to the forward pass, and what does batching the tiles buy?

One job: measure and print, side by side in one run, tiles/s of
  (a) seg_mlops.infer.tiled_probs, batched (tiled_infer.batch_size tiles per predict_on_batch),
  (b) the same function one tile at a time (batch_size 1: the reference predicted tile by tile),
  (c) the raw batched forward pass over the same tiles: model.predict_on_batch on tiles cut and
      batched beforehand (same batches as (a)), no cutting, no stitching,
  (a') as (a) with mode "context" (paste cores instead of blending), for reference,
and the ratios a/b and a/c (target a/c >= 0.85). It asserts nothing: timings are for reading.

Run from the repository root:

    python bench/tiled.py            # 4 images, 3 rounds: a few minutes on 2 CPU cores
    python bench/tiled.py --quick    # 1 image, 1 round

Data: ../shared/data/seed-mini-test/Tiled-Cervical-Cancer/images relative to the repository root,
or $SEG_MLOPS_REAL_DATA/seed-mini-test/Tiled-Cervical-Cancer/images.

Method. A seed-like binary UNet (random weights: speed does not depend on them) takes 256 px
tiles, tile_size 0 (tiles at the model's size, so no resizing) and overlap 32 (stride 192): 8 x 11
= 88 tiles per 2048x1536 image. Images are decoded once before timing. Each variant runs once
untimed (graph tracing for every batch shape), then the rounds alternate a, b, c, a' and the
reverse order, so drift on a noisy machine hits every variant alike. A round of a variant is every
image once; its figure is tiles/s. Medians (and bests) are printed with every round's figure, and
the CPU time per tile (less sensitive to other processes' load).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"  # before any TensorFlow import

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
DATA = "seed-mini-test/Tiled-Cervical-Cancer"


def data_dir() -> Path:
    base = os.environ.get("SEG_MLOPS_REAL_DATA")
    path = (Path(base) if base else REPO_ROOT.parent / "shared" / "data") / DATA / "images"
    if not path.is_dir():
        sys.exit(f"images not found: {path} (set SEG_MLOPS_REAL_DATA to the folder holding {DATA})")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 image, 1 round")
    parser.add_argument("--images", type=int, default=4, help="images per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=256, help="model input = tile size (px)")
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="tiles per forward pass in (a) and (c)")
    parser.add_argument("--filters", type=int, default=8)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()
    if args.quick:
        args.images, args.rounds = 1, 1

    import numpy as np
    import tensorflow as tf

    from seg_mlops import infer, tiling
    from seg_mlops.data import list_images, read_rgb
    from seg_mlops.model import build_unet

    images = [read_rgb(p) for p in list_images(data_dir())[:args.images]]
    model = build_unet(image_height=args.size, image_width=args.size, base_filters=args.filters,
                       num_layers=args.layers, base_kernels=3, dropout_rate=0.05)

    # (c)'s input: the same tiles as (a), cut and batched beforehand.
    tile = (args.size, args.size)
    pre_cut = []
    for image in images:
        grid = tiling.overlap_grid(*image.shape[:2], tile, args.overlap)
        tiles = np.stack([image[t.y:t.y + t.h, t.x:t.x + t.w] for t in grid]).astype(np.float32)
        pre_cut.extend(tiles[i:i + args.batch] for i in range(0, len(tiles), args.batch))
    n_tiles = sum(len(b) for b in pre_cut)

    def tiled(batch: int, mode: str):
        return lambda: [infer.tiled_probs(model, im, overlap=args.overlap, mode=mode, batch_size=batch)
                        for im in images]

    def raw():
        return [np.asarray(model.predict_on_batch(b)) for b in pre_cut]

    variants = {"a batched": tiled(args.batch, "average"), "b one tile at a time": tiled(1, "average"),
                "c raw forward pass": raw, "a' batched, context": tiled(args.batch, "context")}
    print(f"python {platform.python_version()}, tensorflow {tf.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{len(images)} images 2048x1536, {n_tiles} tiles of {args.size} px per round (overlap "
          f"{args.overlap}), UNet base_filters {args.filters}, num_layers {args.layers}, "
          f"{model.count_params()} params, batch {args.batch}")
    for fn in variants.values():  # warm-up: tracing for every batch shape
        fn()
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    order = list(variants)
    for r in range(args.rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            c0, t0 = time.process_time(), time.perf_counter()
            variants[name]()
            wall[name].append(n_tiles / (time.perf_counter() - t0))
            cpu[name].append((time.process_time() - c0) / n_tiles * 1000)
            print(f"  round {r + 1} {name}: {wall[name][-1]:.1f} tiles/s", flush=True)
    med = {k: statistics.median(v) for k, v in wall.items()}
    print("\nvariant                    tiles/s median (best)   CPU ms/tile median   every round")
    for name in variants:
        print(f"{name:26s} {med[name]:8.1f} ({max(wall[name]):6.1f})   {statistics.median(cpu[name]):10.1f}"
              f"           {' '.join(f'{v:.1f}' for v in wall[name])}")
    print(f"\na/b (batched vs one tile at a time): {med['a batched'] / med['b one tile at a time']:.2f}")
    print(f"a/c (tiled inference vs raw forward pass): {med['a batched'] / med['c raw forward pass']:.2f} "
          "(target >= 0.85)")
    print(f"a'/c (context mode vs raw forward pass): {med['a' + chr(39) + ' batched, context'] / med['c raw forward pass']:.2f}")


if __name__ == "__main__":
    main()
