"""Dataset in, config out: the rules of `seg-mlops plan`, and the one measurement they need.

nnU-Net's lesson: most of a segmentation model's quality comes from a recipe planned from the
data, not from its architecture. Each rule below is a small pure function with its reason in its
docstring (the README lists them); `plan()` applies them to a dataset's profile and to a measured
training-step time (injectable, so the plan is deterministic in tests), and `to_yaml()` writes an
ordinary config with a comment on every planned value.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from seg_mlops import config as config_mod
from seg_mlops import data, dataset_profile
from seg_mlops.config import Config
from seg_mlops.errors import SegMlopsError

MIN_WIDTH_PX = 8  # the thinnest class must stay this wide at the input size (3x3 convs see across it)
MIN_SIDE, MAX_SIDE = 64, 512
BRIDGE_PX = 8  # the bridge's feature map side: 8x8 still holds layout, smaller is a vector
MAX_LEVELS = 6
BASE_FILTERS = 16
MIN_STEPS = 1000  # optimizer steps a budget must allow, else the input size is halved
MAX_BATCH = 8
MEMORY_BUDGET = 2 << 30  # bytes of activations a batch may take (CPU training)
LEARNING_RATE = 1e-3  # Adam's default, with batch norm and a warm-up
RARE_CLASS = 0.05  # a foreground class under this pixel share is rare
VALID_SHARE = 0.35  # a validation batch costs about a third of a training step (forward only)
EPOCH_OVERHEAD_S = 1.5  # checkpoint, epoch panels, resume state, logging (bench/overhead.py)
BUDGET_USE = 0.9  # of the budget planned for; the rest absorbs timing noise


# The network's fixed choices (the size rules decide the rest).
NETWORK = {
    "model.base_filters": (BASE_FILTERS, "CPU budget: 16, doubling per level"),
    "model.base_kernels": (3, "3x3 everywhere: depth gives the receptive field, cheaper than wide kernels"),
    "model.dilation": (1, "no dilation: the bridge already sees the whole input"),
    "model.dropout_rate": (0.0, "batch norm and augmentation regularise"),
    "model.batch_norm": (True, "stable training at a high learning rate"),
}


@dataclass(frozen=True)
class Planned:
    """One planned config value and why."""

    key: str  # flat config key, e.g. "model.image_height"
    value: Any
    why: str


# ----------------------------------------------------------------------------- what the data is

def detect_classes(root: str | Path) -> dict[str, Any]:
    """Binary or multiclass, from the dataset's files: `classes.csv` (id, name, r, g, b) when
    present, else the masks: colour masks with 3 or more colours covering >= 0.5 % of the pixels
    each are multiclass (those colours, the most frequent first as background), anything else
    binary. Returns flat config keys (model.num_classes and, for multiclass, data.rgb_map)."""
    table = Path(root) / "classes.csv"
    if table.is_file():
        rows = sorted(csv.DictReader(table.open()), key=lambda r: int(r["id"]))
        colours = [[int(r["r"]), int(r["g"]), int(r["b"])] for r in rows]
        return {"model.num_classes": len(colours), "data.rgb_map": colours} if len(colours) > 2 else \
            {"model.num_classes": 1}
    masks = data.list_images(Path(root) / "train" / "masks")[:16]
    if not masks:
        raise SegMlopsError(f"no masks in {Path(root) / 'train' / 'masks'}: plan reads <root>/{{train,valid,test}}"
                            "/{images,masks}; point it at such a folder")
    counts: dict[int, int] = {}
    for path in masks:
        mask = data.decode_file(path, labels=True)
        if mask.ndim == 2:
            return {"model.num_classes": 1}
        flat = mask[..., :3].reshape(-1, 3).astype(np.uint32)
        packed, n = np.unique((flat[:, 2] << 16) | (flat[:, 1] << 8) | flat[:, 0], return_counts=True)  # BGR -> RGB
        for p, c in zip(packed.tolist(), n.tolist()):
            counts[p] = counts.get(p, 0) + c
    total = sum(counts.values())
    main = [p for p, c in sorted(counts.items(), key=lambda kv: -kv[1]) if c >= 0.005 * total]
    if len(main) < 3:
        return {"model.num_classes": 1}
    return {"model.num_classes": len(main), "data.rgb_map": [[p >> 16, (p >> 8) & 255, p & 255] for p in main]}


def profile(cfg: Config, splits=data.SPLITS) -> dict:
    """Everything the rules read: per-split counts and class fractions (data.prepare, which also
    checks every file) and the train split's shape (dataset_profile.describe)."""
    cfg, found = data.prepare(cfg, splits)
    return {"mask_encoding": found.encoding, "splits": found.splits, **dataset_profile.describe(cfg)}


# ----------------------------------------------------------------------------- the rules

def size_range(profile: dict) -> tuple[int, int, str]:
    """The input sides worth trying, largest first. Largest: the median image's shorter side
    (upsampling adds nothing), at most MAX_SIDE. Smallest: the side that keeps the thinnest
    foreground class MIN_WIDTH_PX wide in the larger images (90th percentile of the shorter side:
    resizing shrinks big images most), at least MIN_SIDE. Multiples of 32."""
    largest = min(profile["height"]["median"], profile["width"]["median"], MAX_SIDE)
    largest = max(int(largest // 32 * 32), MIN_SIDE)
    side = min(profile["height"]["p90"], profile["width"]["p90"])
    widths = {c: o["width_px"] for c, o in profile["objects"].items() if o["width_px"] == o["width_px"]}
    if not widths:  # no foreground in the described sample: nothing bounds the size from below
        return largest, MIN_SIDE, f"no objects in the described sample; images are {largest} px or more"
    thinnest = min(widths, key=widths.get)
    smallest = int(min(max(math.ceil(side * MIN_WIDTH_PX / widths[thinnest] / 32) * 32, MIN_SIDE), largest))
    return largest, smallest, (f"class {thinnest} is {widths[thinnest]:.1f} px wide in images of {side:.0f} px: "
                               f"{smallest} px or more keeps it >= {min(MIN_WIDTH_PX, widths[thinnest] * smallest / side):.1f} "
                               f"px wide; images are {largest} px or more")


def levels(size: int) -> int:
    """Encoder levels (bridge included) so the bridge's map is BRIDGE_PX wide: deeper adds
    receptive field but below 8x8 the map no longer holds the image's layout."""
    return int(min(max(round(math.log2(size / BRIDGE_PX)) + 1, 3), MAX_LEVELS))


def activation_bytes(size: int, num_layers: int, base_filters: int = BASE_FILTERS) -> int:
    """Bytes one sample's activations take in training: per level two convolutions in the encoder
    and two in the decoder, each kept as conv output, batch-norm output and activation, float32,
    doubled for their gradients."""
    return int(sum((size / 2 ** i) ** 2 * base_filters * 2 ** i * 4 * 3 * 4 * 2 for i in range(num_layers)))


def batch_size(size: int, num_layers: int, train_images: int, memory: int = MEMORY_BUDGET) -> int:
    """The largest power of two <= MAX_BATCH whose activations fit `memory`, and small enough for
    8 steps per epoch (a tiny dataset wants more updates, not bigger ones); at least 2 (batch norm
    needs two samples)."""
    fits = max(memory // activation_bytes(size, num_layers), 1)
    cap = min(fits, MAX_BATCH, max(train_images // 8, 2))
    return int(max(2 ** int(math.log2(cap)), 2))


def loss(num_classes: int, fractions: list[float]) -> tuple[str, str]:
    """Dice + cross-entropy: cross-entropy gives smooth gradients everywhere, dice keeps the
    foreground from drowning in background. Binary: bce_dice_loss (its dice is the foreground's).
    Multiclass: cce_dice_loss, or cce_class_dice_loss when a foreground class is rare (< 5 % of
    the pixels), whose dice weighs every foreground class the same."""
    if num_classes == 1:
        return "bce_dice_loss", f"binary, foreground {fractions[1]:.1%} of the pixels: cross-entropy + dice"
    rare = [i for i, f in enumerate(fractions) if i and f < RARE_CLASS]
    if rare:
        return "cce_class_dice_loss", (f"classes {rare} under {RARE_CLASS:.0%} of the pixels: cross-entropy + "
                                       "dice averaged over the foreground classes, each weighing the same")
    return "cce_dice_loss", "no rare class: cross-entropy + dice over all classes"


def epochs(step_s: float, trace_s: float, train_steps: int, valid_steps: int, budget_minutes: float) -> int:
    """Epochs that fit BUDGET_USE of the budget: each costs its training steps, its validation
    batches (VALID_SHARE of a step each) and EPOCH_OVERHEAD_S; tracing (trace_s, for training and
    validation) is paid once."""
    epoch_s = train_steps * step_s + valid_steps * step_s * VALID_SHARE + EPOCH_OVERHEAD_S
    return max(int((budget_minutes * 60 * BUDGET_USE - 2 * trace_s) // epoch_s), 1)


def augmentation() -> list[Planned]:
    """The standard set: flips and right-angle rotations (microscopy and cytology have no up or
    left), a mild smooth distortion (tissue deforms) and mild brightness changes (staining and
    exposure vary); cheap enough that the pipeline still outruns the model (bench/augment.py)."""
    why = "standard set: no up/left in these images, mild deformation and exposure changes"
    return [Planned("augment.hflip", 0.5, why), Planned("augment.vflip", 0.5, why),
            Planned("augment.rotation", 0.5, why), Planned("augment.distortion", 0.2, why),
            Planned("augment.distortions", [0.01], "displacement up to 1 % of the width: mild"),
            Planned("augment.brightening", 0.2, why),
            Planned("augment.brightening_alpha", 1.1, "contrast x1.1"),
            Planned("augment.brightening_beta", 5.0, "brightness +5 of 255")]


def space(base_filters: int, learning_rate: float) -> dict:
    """A tuning space centred on the plan: filters halved to doubled, the LR a factor 3 each
    way, 3x3 or 5x5 kernels, dropout 0 to 0.1 (the plan has none)."""
    return {"model.base_filters": [base_filters // 2, base_filters, base_filters * 2],
            "model.base_kernels": [3, 5], "model.dropout_rate": [0.0, 0.05, 0.1],
            "train.learning_rate": {"low": float(f"{learning_rate / 3:.3g}"), "high": learning_rate * 3, "log": True}}


StepTimer = Callable[[int, int, int], tuple[float, float]]  # (size, levels, batch) -> (step s, tracing s)


def input_size(prof: dict, budget_minutes: float, time_step: StepTimer) -> dict[str, Any]:
    """The largest side of `size_range` at which the budget allows MIN_STEPS optimizer steps
    (a model that sees each image a few times learns less than a smaller one that sees it often):
    from the largest, halving (never below the objects' smallest side) while it does not. Returns
    the size, levels, batch, step time, epochs and why."""
    size, smallest, why = size_range(prof)
    n_train, n_valid = prof["splits"]["train"]["images"], prof["splits"]["valid"]["images"]
    while True:
        depth = levels(size)
        batch = batch_size(size, depth, n_train)
        steps = (math.ceil(n_train / batch), math.ceil(n_valid / batch))
        step_s, trace_s = time_step(size, depth, batch)
        count = epochs(step_s, trace_s, *steps, budget_minutes)
        if count * steps[0] >= MIN_STEPS or size <= smallest:
            why += f"; {size} px: {count * steps[0]} steps fit the budget (rule: >= {MIN_STEPS} at the largest size)"
            return {"size": size, "levels": depth, "batch": batch, "step_s": step_s, "epochs": count, "why": why}
        why += f"; {size} px: only {count * steps[0]} steps"
        size = max(math.ceil(size / 2 / 32) * 32, smallest)


def plan(root: str | Path, prof: dict, classes: dict, budget_minutes: float, time_step: StepTimer,
         threads: int = 0) -> list[Planned]:
    """The planned config values for the dataset at `root`, each with its reason."""
    fit = input_size(prof, budget_minutes, time_step)
    name, rate = loss(classes["model.num_classes"], prof["splits"]["train"]["class_fractions"])
    count = fit["epochs"]
    warmup = max(1, round(0.05 * count)) if count >= 4 else 0
    timing = f"a step takes {fit['step_s'] * 1000:.0f} ms here (measured)"
    entries = [
        Planned("experiment", _experiment(root), "the dataset's folder name"),
        Planned("data.root", str(Path(root).resolve()), "the dataset"),
        *[Planned(k, v, "from " + ("classes.csv" if (Path(root) / "classes.csv").is_file() else "the mask colours"))
          for k, v in classes.items()],
        Planned("data.cache", "auto", "decoded pairs kept in memory when they fit (decoding once)"),
        Planned("model.image_height", fit["size"], fit["why"]),
        Planned("model.image_width", fit["size"], "square input"),
        Planned("model.num_layers", fit["levels"], f"bridge {fit['size'] // 2 ** (fit['levels'] - 1)} px wide"),
        *[Planned(k, v, why) for k, (v, why) in NETWORK.items()],
        Planned("train.batch_size", fit["batch"], "largest power of two <= 8 whose activations fit 2 GiB, "
                                                 ">= 8 steps per epoch"),
        Planned("train.learning_rate", LEARNING_RATE, "Adam's default, safe with batch norm and a warm-up"),
        Planned("train.lr_schedule", "cosine", "warm-up then cosine to 0: a fixed-length recipe that ends converged"),
        Planned("train.warmup_epochs", warmup, "about 5 % of the epochs"),
        Planned("train.epochs", count, f"fills {BUDGET_USE:.0%} of {budget_minutes:g} min: {timing}"),
        Planned("train.max_minutes", float(budget_minutes), "a slower machine stops on time"),
        Planned("train.patience", 0, "no early stopping: the cosine's end is where it converges"),
        Planned("train.loss", name, rate),
        *augmentation(),
        Planned("tune.space", space(BASE_FILTERS, LEARNING_RATE), "centred on the planned values"),
        Planned("tune.epochs", max(count // 4, 2), "a quarter of the planned epochs per trial"),
    ]
    if threads:
        entries.append(Planned("train.threads", threads, "as timed"))
    return entries


def make_plan(root: str | Path, budget_minutes: float, threads: int = 0,
              time_step: StepTimer | None = None) -> tuple[list[Planned], dict]:
    """Profile the dataset at `root` and plan its config for `budget_minutes` of training here
    (`time_step` defaults to measuring this machine). Returns the plan and the profile."""
    root = Path(root).resolve()
    classes = detect_classes(root)
    if not (root / "valid" / "images").is_dir():
        classes["data.valid_fraction"] = 0.2  # no valid folder: a seeded fifth of train
    cfg = config_mod.override(Config(), {"data.root": str(root), **classes})
    prof = profile(cfg, [s for s in data.SPLITS if s == "valid" or (root / s / "images").is_dir()])
    name, _ = loss(cfg.model.num_classes, prof["splits"]["train"]["class_fractions"])
    base = config_mod.override(cfg, {**{k: v for k, (v, _) in NETWORK.items()}, "train.loss": name,
                                     "train.learning_rate": LEARNING_RATE})
    return plan(root, prof, classes, budget_minutes, time_step or step_timer(base), threads), prof


def _experiment(root: str | Path) -> str:
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(root).resolve().name.lower())
    return name.strip("-") or "dataset"


def as_config(entries: list[Planned]) -> Config:
    """The planned values as a Config (checks them as any config is checked)."""
    return config_mod.override(Config(), {e.key: e.value for e in entries})


def to_yaml(entries: list[Planned], header: str = "") -> str:
    """An ordinary config file: sections in config order, a comment above every planned value."""
    lines = [f"# {line}" for line in header.splitlines()]
    for section in ("", *config_mod.SECTIONS):
        chosen = [e for e in entries if (e.key.split(".")[0] if "." in e.key else "") == section]
        if not chosen:
            continue
        if section:
            lines.append(f"{section}:")
        pad = "  " if section else ""
        for e in chosen:
            key = e.key.split(".", 1)[1] if section else e.key
            lines.append(f"{pad}# {e.why}")
            lines.append(f"{pad}{key}:{_value(e.value, pad)}")
    return "\n".join(lines) + "\n"


def _value(value: Any, pad: str) -> str:
    if isinstance(value, dict):
        body = yaml.safe_dump(value, default_flow_style=None, sort_keys=False).rstrip("\n")
        return "\n" + "\n".join(f"{pad}  {line}" for line in body.splitlines())
    return " " + yaml.safe_dump(value, default_flow_style=True).removesuffix("...\n").strip()


# ----------------------------------------------------------------------------- the measurement

def step_timer(base: Config, repeats: int = 5) -> StepTimer:
    """Times one training step of the planned network on this machine: build and compile it at
    (size, levels, batch) with the plan's other choices, run one step (tracing, returned as the
    second value), then the median of `repeats` more on random data."""
    def time_step(size: int, depth: int, batch: int) -> tuple[float, float]:
        import keras

        from seg_mlops import train
        from seg_mlops.model import build_unet

        cfg = config_mod.override(base, {"model.image_height": size, "model.image_width": size,
                                         "model.num_layers": depth, "train.batch_size": batch})
        keras.utils.clear_session()
        model = build_unet(**dataclasses.asdict(cfg.model))
        train.compile_model(model, cfg)
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
        y = np.eye(max(cfg.model.num_classes, 2), dtype="float32")[rng.integers(0, cfg.model.num_classes, (batch, size, size))]
        y = y[..., 1:] if cfg.model.num_classes == 1 else y
        start = time.perf_counter()
        model.train_on_batch(x, y)
        trace = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times.append(time.perf_counter() - start)
        step = float(np.median(times))
        print(f"plan: {size} px, {depth} levels, batch {batch}: {step * 1000:.0f} ms per step "
              f"(first step with tracing {trace:.1f} s)")
        return step, max(trace - step, 0.0)
    return time_step
