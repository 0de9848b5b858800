"""The `seg-mlops` command line: thin click commands that delegate to the modules.

Heavy imports (TensorFlow) happen inside the commands, so `seg-mlops --help` is instant. Every
user error (SegMlopsError) is printed as one `Error: ...` line with exit code 1, no traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from seg_mlops.errors import SegMlopsError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ start-up chatter out of the way


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SegMlopsError as exc:
            raise click.ClickException(str(exc)) from None


config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False), required=True,
                             help="Experiment YAML (see configs/).")
set_option = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                          help="Override a config key, e.g. --set train.epochs=3 (repeatable).")
model_option = click.option("--model", "model_path", type=click.Path(), required=True,
                            help="A saved model (best_model.keras written by train).")


def _load(config_path: str, overrides: tuple[str, ...]):
    from seg_mlops import config

    return config.load(config_path, overrides)


@click.group(cls=_Group)
@click.version_option(package_name="seg-mlops")
def cli() -> None:
    """Train, evaluate and run Keras UNet segmentation models."""


@cli.command("make-demo-data")
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--classes", type=click.IntRange(1, 5), default=1, show_default=True,
              help="1 = binary masks; 2-5 = RGB colour masks (background first).")
@click.option("--size", type=click.IntRange(16), default=128, show_default=True, help="Image side in px.")
@click.option("--counts", type=(int, int, int), default=(64, 16, 16), show_default=True,
              help="Images in train, valid, test.")
@click.option("--seed", type=int, default=0, show_default=True)
def make_demo_data(output: str, classes: int, size: int, counts: tuple[int, int, int], seed: int) -> None:
    """Write a synthetic cell-like dataset to OUTPUT/{train,valid,test}/{images,masks}."""
    from seg_mlops import synthetic

    root = synthetic.make_dataset(output, classes=classes, size=size, counts=counts, seed=seed)
    click.echo(f"wrote {sum(counts)} image/mask pairs to {root}")
    if classes > 1:
        click.echo(f"rgb_map for the config: {synthetic.rgb_map(classes)}")


@cli.command()
@config_option
@set_option
@click.option("--overwrite", is_flag=True, help="Reuse an output folder that already holds a model.")
def train(config_path: str, overrides: tuple[str, ...], overwrite: bool) -> None:
    """Train a UNet; writes the best model, history CSVs/plots and epoch panels."""
    cfg = _load(config_path, overrides)  # config errors first, before TensorFlow loads
    from seg_mlops import train as train_mod

    result = train_mod.train(cfg, overwrite=overwrite)
    from seg_mlops.losses import monitor_mode

    values = result.history[cfg.train.monitor]
    best = (min if monitor_mode(cfg.train.monitor) == "min" else max)(values)
    click.echo(f"best {cfg.train.monitor}={best:.4f} after {len(values)} epochs; model: {result.model_path}")


@cli.command()
@config_option
@model_option
@set_option
@click.option("--output", type=click.Path(file_okay=False), default=None,
              help="Folder for evaluation.csv and per_image.csv [default: the model's folder].")
def evaluate(config_path: str, model_path: str, overrides: tuple[str, ...], output: str | None) -> None:
    """Score a model on the test split of the config's dataset."""
    cfg = _load(config_path, overrides)
    from seg_mlops import evaluate as evaluate_mod
    from seg_mlops.infer import load_model

    model = load_model(model_path)
    out = Path(output) if output else Path(model_path).parent
    results = evaluate_mod.evaluate(model, cfg, out)
    for name, value in results.items():
        click.echo(f"{name},{value:.4f}")
    click.echo(f"wrote {out / 'evaluation.csv'} and {out / 'per_image.csv'}")


@cli.command()
@config_option
@model_option
@set_option
@click.option("--images", type=click.Path(file_okay=False), required=True, help="Folder of images (any size).")
@click.option("--output", type=click.Path(file_okay=False), required=True, help="Folder for the masks.")
@click.option("--colorize/--no-colorize", default=None, help="Also write colour masks [config: infer.colorize].")
@click.option("--overlay/--no-overlay", default=None, help="Also write overlays [config: infer.overlay].")
def infer(config_path: str, model_path: str, overrides: tuple[str, ...], images: str, output: str,
          colorize: bool | None, overlay: bool | None) -> None:
    """Predict masks for a folder of images, written at each image's original size."""
    cfg = _load(config_path, overrides)
    from seg_mlops.infer import infer_folder, load_model

    model = load_model(model_path)
    written = infer_folder(
        model, images, output, palette=cfg.palette(), threshold=cfg.infer.threshold,
        batch_size=cfg.infer.batch_size,
        colorize_masks=cfg.infer.colorize if colorize is None else colorize,
        overlays=cfg.infer.overlay if overlay is None else overlay,
        alpha=cfg.infer.overlay_alpha, interpolation=cfg.data.image_interpolation)
    click.echo(f"wrote {len(written)} masks to {output}")


def main() -> None:
    cli(prog_name="seg-mlops")


if __name__ == "__main__":
    main()
