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
    """Turns every error into one `Error: ...` line and exit code 1; `--debug` shows tracebacks."""

    def invoke(self, ctx: click.Context):
        if ctx.params.get("debug"):
            return super().invoke(ctx)  # Python's own traceback, for bug reports
        try:
            return super().invoke(ctx)
        except SegMlopsError as exc:
            raise click.ClickException(str(exc)) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit,
                KeyboardInterrupt):
            raise  # click's own usage errors and exits, and Ctrl-C, keep their behaviour
        except Exception as exc:  # a bug or an unforeseen input: still one line, plus how to see more
            text = str(exc).strip()
            what = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
            raise click.ClickException(f"{what} (rerun with seg-mlops --debug for the traceback)") from None


config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False), required=True,
                             help="Experiment YAML (see configs/), or a reference train_eval_infer.config.")
set_option = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                          help="Override a config key, e.g. --set train.epochs=3 (repeatable).")
sets_option = click.option("--sets", default="", metavar="'K=V K=V'",
                           help="Several overrides in one shell-quoted string (MLproject's -P set=...).")
def extras_options(command):
    """--colorize/--overlay of infer and tiled-infer (None: the config's infer.* value)."""
    command = click.option("--overlay/--no-overlay", default=None,
                           help="Also write overlays [config: infer.overlay].")(command)
    return click.option("--colorize/--no-colorize", default=None,
                        help="Also write colour masks [config: infer.colorize].")(command)


tta_option = click.option("--tta", is_flag=True,
                          help="Average the predictions of each image and its left-right and up-down flips.")

model_option = click.option("--model", "model_path", type=click.Path(), required=True,
                            help="best_model.keras written by train, or an MLflow URI "
                                 "(models:/seg-<experiment>@champion, runs:/<id>/model).")


def _load(config_path: str, overrides: tuple[str, ...], sets: str = ""):
    import shlex

    from seg_mlops import loading

    try:
        extra = shlex.split(sets)
    except ValueError as exc:  # e.g. an unclosed quote
        raise SegMlopsError(f"--sets {sets!r}: {exc}") from None
    return loading.load(config_path, [*overrides, *extra])


@click.group(cls=_Group)
@click.version_option(package_name="seg-mlops")
@click.option("--debug", is_flag=True, envvar="SEG_MLOPS_DEBUG",
              help="Show Python tracebacks instead of one-line errors (also SEG_MLOPS_DEBUG=1).")
def cli(debug: bool) -> None:
    """Train, evaluate and run Keras UNet segmentation models."""


@cli.command()
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option("--budget-minutes", type=click.FloatRange(0.5), default=10.0, show_default=True,
              help="Wall-clock minutes of training the plan fills on this machine.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True,
              help="CPU threads to time and train with [train.threads; 0 = all].")
def plan(root: str, budget_minutes: float, threads: int) -> None:
    """Profile the dataset at ROOT (<root>/{train,valid,test}/{images,masks}) and print a config
    that trains well in --budget-minutes here: seg-mlops plan DATA > configs/x.yaml."""
    import contextlib
    import json
    import sys

    from seg_mlops import planning, train as train_mod

    with contextlib.redirect_stdout(sys.stderr):  # stdout is the config
        train_mod.apply_threads(threads)
        entries, profile = planning.make_plan(root, budget_minutes, threads)
        click.echo(json.dumps(profile, indent=1), err=True)
    click.echo(planning.to_yaml(entries, f"seg-mlops plan {root} --budget-minutes {budget_minutes:g}"
                                         + (f" --threads {threads}" if threads else "")))


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
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Experiment YAML (see configs/). Required unless --resume (which defaults to the run's own).")
@set_option
@sets_option
@click.option("--overwrite", is_flag=True, help="Reuse an output folder that already holds a model.")
@click.option("--resume", "resume_run_id", default="", metavar="RUN_ID",
              help="Continue this FAILED or KILLED run from its last epoch, in the same MLflow run "
                   "(also uploads what a lost tracking server did not get).")
def train(config_path: str | None, overrides: tuple[str, ...], sets: str, overwrite: bool,
          resume_run_id: str) -> None:
    """Train a UNet in an MLflow run: params, curves, epoch panels, evaluation and the model."""
    if not config_path and not resume_run_id:
        raise SegMlopsError("train needs --config (or --resume RUN_ID)")
    # config errors first, before TensorFlow loads
    cfg = _load(config_path, overrides, sets) if config_path else None
    if cfg is None and (overrides or sets):
        raise SegMlopsError("--set/--sets need --config: a resumed run keeps its own config")
    from seg_mlops import tracking
    from seg_mlops.losses import best_value

    if cfg is not None and cfg.data.folds and cfg.data.fold == -1 and not resume_run_id:
        _cross_validate(cfg, overwrite)
        return
    if resume_run_id:
        cfg = tracking.resume_config(resume_run_id, cfg)
    result, run_id = tracking.train(cfg, overwrite=overwrite, resume_run_id=resume_run_id or None)
    values = result.history[cfg.train.monitor]
    best = best_value(values, cfg.train.monitor)
    if run_id is None:  # a non-chief worker of a multi_worker run
        click.echo(f"worker done after {len(values)} epochs; the chief logs the MLflow run and writes the model")
        return
    click.echo(f"best {cfg.train.monitor}={best:.4f} after {len(values)} epochs; model: {result.model_path}")
    click.echo(f"MLflow run {run_id} in experiment '{cfg.experiment}' ({tracking.tracking_uri()})")


def _cross_validate(cfg, overwrite: bool) -> None:
    """k-fold cross-validation (data.folds): per-fold best values, mean ± std, test scores."""
    import math

    from seg_mlops import crossval, tracking

    result = crossval.run_cv(cfg, overwrite=overwrite)
    monitor, test = result.monitor, crossval.test_key(result.monitor)
    for fold in result.folds:
        score = fold.test.get(test, math.nan)
        click.echo(f"fold {fold.index}: best {monitor}={fold.best:.4f}, {test}={score:.4f} (run {fold.run_id})")
    click.echo(f"cross-validation: {monitor} {result.mean:.4f} ± {result.std:.4f} "
               f"(mean ± sample std over {len(result.folds)} folds)")
    click.echo(f"fold ensemble: {test}={result.ensemble_test.get(test, math.nan):.4f}; model: {result.model_uri}")
    click.echo(f"MLflow run {result.parent_run_id} in experiment '{cfg.experiment}' ({tracking.tracking_uri()})")


@cli.command()
@config_option
@model_option
@set_option
@sets_option
@click.option("--output", type=click.Path(file_okay=False), default=None,
              help="Folder for evaluation.csv and per_image.csv [default: the model's folder, or "
                   "outputs/<experiment>/evaluate for a models:/ URI].")
def evaluate(config_path: str, model_path: str, overrides: tuple[str, ...], sets: str,
             output: str | None) -> None:
    """Score a model (file or MLflow URI) on the test split; logged as an MLflow run."""
    cfg = _load(config_path, overrides, sets)
    import mlflow

    from seg_mlops import evaluate as evaluate_mod
    from seg_mlops import tracking

    model = tracking.load_model(model_path)
    is_file = Path(model_path).exists()
    out = Path(output) if output else (Path(model_path).parent if is_file else cfg.output_dir / "evaluate")
    with tracking.start_run(cfg, run_name="evaluate", tags=tracking.run_tags(cfg)):
        mlflow.set_tag("seg_mlops.evaluated_model", model_path)
        results = evaluate_mod.evaluate(model, cfg, out)
        tracking.log_evaluation(results, out)
    for name, value in results.items():
        click.echo(f"{name},{value:.4f}")
    click.echo(f"wrote {out / 'evaluation.csv'} and {out / 'per_image.csv'}")


@cli.command()
@config_option
@model_option
@set_option
@sets_option
@click.option("--images", type=click.Path(file_okay=False), required=True, help="Folder of images (any size).")
@click.option("--output", type=click.Path(file_okay=False), required=True, help="Folder for the masks.")
@extras_options
@tta_option
def infer(config_path: str, model_path: str, overrides: tuple[str, ...], sets: str, images: str, output: str,
          colorize: bool | None, overlay: bool | None, tta: bool) -> None:
    """Predict masks for a folder of images, written at each image's original size."""
    cfg = _load(config_path, overrides, sets)
    from seg_mlops import tracking
    from seg_mlops.infer import Settings, infer_folder

    model = tracking.load_model(model_path)
    written = infer_folder(
        model, images, output, palette=cfg.palette(), settings=Settings.from_config(cfg, "resize", tta),
        colorize_masks=cfg.infer.colorize if colorize is None else colorize,
        overlays=cfg.infer.overlay if overlay is None else overlay, alpha=cfg.infer.overlay_alpha)
    click.echo(f"wrote {len(written)} masks to {output}")


@cli.command("tiled-infer")
@config_option
@model_option
@set_option
@sets_option
@click.option("--images", type=click.Path(file_okay=False), required=True, help="Folder of large images.")
@click.option("--output", type=click.Path(file_okay=False), required=True, help="Folder for the masks.")
@extras_options
@tta_option
def tiled_infer(config_path: str, model_path: str, overrides: tuple[str, ...], sets: str, images: str,
                output: str, colorize: bool | None, overlay: bool | None, tta: bool) -> None:
    """Predict masks of large images tile by tile (config: tiled_infer), at full resolution."""
    cfg = _load(config_path, overrides, sets)
    from seg_mlops import tracking
    from seg_mlops.infer import tile_shape, tiled_infer_folder

    model = tracking.load_model(model_path)
    written = tiled_infer_folder(model, images, output, cfg, colorize_masks=colorize, overlays=overlay, tta=tta)
    t = cfg.tiled_infer
    height, width = tile_shape(model, t.tile_size)
    click.echo(f"wrote {len(written)} masks to {output} ({height}x{width} px tiles, overlap {t.overlap}, "
               f"mode {t.mode})")


@cli.command("batch-infer")
@click.option("--model", "model_uri", required=True,
              help="A pipeline model: models:/seg-<experiment>@champion, runs:/<id>/pipeline or a folder.")
@click.option("--images", "inputs", multiple=True, required=True,
              help="A folder of images or a glob ('slides/**/*.jpg'); repeat for more.")
@click.option("--output", type=click.Path(file_okay=False), required=True,
              help="Folder for the masks (same relative names, .png) and failed.csv.")
@click.option("--engine", type=click.Choice(["local", "spark"]), default="local", show_default=True,
              help="local: this process; spark: Apache Spark through mlflow.pyfunc.spark_udf.")
@click.option("--master", default="local[*]", show_default=True,
              help="Spark master for --engine spark (spark://host:7077, yarn, k8s://...).")
@click.option("--mode", type=click.Choice(["resize", "tiled"]), default="resize", show_default=True,
              help="Resize each image to the model, or tile it at full resolution.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="Binary foreground threshold [default: the model's, from its training config].")
@tta_option
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True,
              help="Images per pipeline call (per Arrow batch on Spark).")
def batch_infer(model_uri: str, inputs: tuple[str, ...], output: str, engine: str, master: str, mode: str,
                threshold: float | None, tta: bool, batch_size: int) -> None:
    """Masks for many images with a registered pipeline; skips masks already written, reports
    undecodable images in failed.csv instead of stopping."""
    from seg_mlops import batch, tracking

    if not Path(model_uri).exists():
        tracking.use_store(create=False)
    params = {"mode": mode, "tta": tta, **({} if threshold is None else {"threshold": threshold})}
    r = batch.run(model_uri, inputs, output, engine=engine, master=master, params=params, batch_size=batch_size)
    scored = r.written + len(r.failed)
    rate = f", {scored / r.seconds:.1f} images/s" if scored and r.seconds else ""
    click.echo(f"wrote {r.written} masks to {output} in {r.seconds:.1f} s ({engine}{rate}); "
               f"{r.skipped} already there; {len(r.failed)} failed"
               + (f" (reasons in {Path(output) / batch.FAILED_FILE})" if r.failed else ""))


@cli.command("make-tiles")
@click.option("--images", type=click.Path(file_okay=False), required=True, help="Folder of large images.")
@click.option("--masks", type=click.Path(file_okay=False), required=True,
              help="Their masks (paired by file name, same size).")
@click.option("--tile", type=click.IntRange(1), required=True, help="Tile side in px.")
@click.option("--output", type=click.Path(file_okay=False), required=True,
              help="Writes OUTPUT/images and OUTPUT/masks (run once per split: OUTPUT=dataset/X/train ...).")
@click.option("--overlap", type=click.IntRange(0), default=0, show_default=True,
              help="Px shared by neighbouring tiles.")
@click.option("--whole", type=click.IntRange(0), default=0, show_default=True, metavar="SIZE",
              help="Also add each pair resized to SIZE x SIZE (<stem>_whole.png), as mixed datasets do; 0 = no.")
@click.option("--edge", type=click.Choice(["shift", "pad", "skip"]), default="shift", show_default=True,
              help="Border tiles: shift the last one inward (all full size), pad with black/background, "
                   "or skip the strip.")
@click.option("--overwrite", is_flag=True, help="Replace the images already in OUTPUT/images and OUTPUT/masks.")
def make_tiles(images: str, masks: str, tile: int, output: str, overlap: int, whole: int, edge: str,
               overwrite: bool) -> None:
    """Cut large image/mask pairs into TILE x TILE pairs named <stem>_<row>x<col>.png."""
    from seg_mlops.tiled_dataset import make_tiles as make

    r = make(images, masks, output, tile=tile, overlap=overlap, whole=whole, edge=edge, overwrite=overwrite)
    click.echo(f"wrote {r.tiles} tile pairs" + (f" and {r.wholes} whole pairs" if r.wholes else "")
               + f" from {r.pairs} pairs to {output}/images and {output}/masks"
               + (f"; {r.skipped} pairs smaller than one tile gave none" if r.skipped else ""))


@cli.command()
@config_option
@set_option
@click.option("--metric", default="", help="Compare runs on this metric [default: train.monitor].")
@click.option("--run-id", default=None, help="Register this run instead of the experiment's best.")
@click.option("--from-study", is_flag=True, help="Register the best trial of the dataset's Optuna study.")
@click.option("--force", type=click.BOOL, default=False, is_flag=False, flag_value=True,
              help="Make it champion even if it is not better or not comparable (other data or classes) "
                   "(--force, or --force true|false).")
def register(config_path: str, overrides: tuple[str, ...], metric: str, run_id: str | None,
             from_study: bool, force: bool) -> None:
    """Register the experiment's best run as seg-<experiment>; alias champion if it is
    significantly better than the champion on the test split (paired per image)."""
    cfg = _load(config_path, overrides)
    from seg_mlops import registry

    if from_study:
        from seg_mlops import tuning

        run_id = tuning.best_trial_run_id(cfg)
    r = registry.register_best(cfg, metric=metric or None, force=force, run_id=run_id)
    click.echo(f"{r.name} version {r.version}: {r.metric}={r.value:.4f} (run {r.run_id}) is candidate")
    if r.comparison is not None:
        click.echo(f"paired test comparison, A = champion, B = version {r.version}:")
        click.echo(r.comparison.table())
    if r.promoted:
        click.echo(f"promoted to champion: models:/{r.name}@champion ({r.reason})")
    else:
        click.echo(f"not promoted: {r.reason} (use --force to override)")


@cli.command()
@config_option
@set_option
@sets_option
@click.argument("models", nargs=-1, metavar="[A B]")
@click.option("--study", is_flag=True,
              help="Compare the study's seeded trial (the config's own values) with its best trial.")
@click.option("--force", is_flag=True, help="Compare models trained on other data or classes anyway.")
@click.option("--no-log", is_flag=True, help="Print only: no MLflow run (with the per-image CSV) is logged.")
def compare(config_path: str, overrides: tuple[str, ...], sets: str, models: tuple[str, ...], study: bool,
            force: bool, no_log: bool) -> None:
    """Is B better than A on the config's test split? Per-image dice, paired (bootstrap interval
    of the mean difference B - A, Wilcoxon p). A and B: run ids, runs:/ or models:/ URIs
    (models:/seg-<experiment>@champion), or .keras files."""
    cfg = _load(config_path, overrides, sets)
    if study == bool(models) or (models and len(models) != 2):
        raise SegMlopsError("compare needs two models (A B) or --study")
    from seg_mlops import compare as compare_mod

    if study:
        from seg_mlops import tuning

        (seed, seed_run), (best, best_run) = tuning.seed_and_best_run_ids(cfg)
        click.echo(f"study '{cfg.experiment}': A = trial {seed} (the config's own values), B = best trial {best}"
                   + (" (the same trial: the config's values are the best found)" if seed == best else ""))
        models = (seed_run, best_run)
    a, b = (compare_mod.resolve(ref) for ref in models)
    result = compare_mod.compare(cfg, a, b, force=force)
    click.echo(result.table())
    if not no_log:
        run_id = compare_mod.log_run(cfg, result)
        click.echo(f"MLflow run {run_id} (compare) in experiment '{cfg.experiment}': per-image scores in "
                   "compare_per_image.csv")


@cli.command()
@config_option
@set_option
@sets_option
@click.option("--n-trials", type=click.IntRange(1), default=None,
              help="Finished trials the study aims at, all workers together [config: tune.n_trials].")
@click.option("--timeout", type=click.FloatRange(0), default=None, help="Seconds for this launch [tune.timeout].")
@click.option("--storage", default=None, help="Optuna storage URL, e.g. postgresql://user@host/optuna "
              "[tune.storage; default: the journal file tracking/optuna.journal].")
def tune(config_path: str, overrides: tuple[str, ...], sets: str, n_trials: int | None, timeout: float | None,
         storage: str | None) -> None:
    """Search the config's tune.space with Optuna; the same command on N machines = one study."""
    cfg = _load(config_path, overrides, sets)
    if storage is not None:
        from seg_mlops import config

        cfg = config.override(cfg, {"tune.storage": storage})
    from seg_mlops import tuning

    study = tuning.run_study(cfg, n_trials=n_trials, timeout=timeout)
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    click.echo(f"study '{study.study_name}' in {tuning.redact(tuning.storage_url(cfg))}: "
               + ", ".join(f"{states.count(s)} {s.lower()}" for s in sorted(set(states))))
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if complete:
        best = study.best_trial
        click.echo(f"best trial {best.number}: {cfg.train.monitor}={best.value:.4f} {best.params}")
        click.echo(f"register it: seg-mlops register --config {config_path} --from-study")


@cli.command()
@config_option
@set_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback unless you say so).")
@click.option("--port", default=8080, show_default=True)
def dashboard(config_path: str, overrides: tuple[str, ...], host: str, port: int) -> None:
    """Start optuna-dashboard on the dataset's study storage."""
    cfg = _load(config_path, overrides)
    import sys

    from seg_mlops import servers, tuning

    url = tuning.storage_url(cfg)
    if "://" not in url and not Path(url).exists():
        raise SegMlopsError(f"no study storage at {url}: run seg-mlops tune first")
    artifacts = tuning.artifact_dir(cfg)  # the trials' pictures (tune uploads them there)
    artifacts.mkdir(parents=True, exist_ok=True)
    click.echo(f"optuna-dashboard on http://{host}:{port} (storage {tuning.redact(url)}, trial pictures in "
               f"{artifacts}); Ctrl-C stops it")
    cmd = [str(Path(sys.executable).with_name("optuna-dashboard")), url, "--host", host, "--port", str(port),
           "--artifact-dir", str(artifacts)]
    raise SystemExit(servers.serve(cmd))  # stopping the command stops the dashboard


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default="configs/demo.yaml",
              show_default=True, help="The demo config (its data.root is made when missing).")
@set_option
@sets_option
def demo(config_path: str, overrides: tuple[str, ...], sets: str) -> None:
    """The main job: synthetic data -> tracked training -> registry -> masks for the test images."""
    cfg = _load(config_path, overrides, sets)
    from seg_mlops import compare, registry, synthetic, tracking
    from seg_mlops.infer import infer_folder

    if not Path(cfg.data.root, "train").is_dir():
        synthetic.make_dataset(cfg.data.root)
        click.echo(f"made the synthetic demo dataset in {cfg.data.root}")
    result, run_id = tracking.train(cfg, overwrite=True)  # the demo's own folder: rerunning replaces it
    try:
        r = registry.register_best(cfg, run_id=run_id)
        click.echo(f"{r.name} version {r.version}: {r.metric}={r.value:.4f}"
                   + (" -> champion" if r.promoted else f" ({r.reason})"))
    except compare.NotComparable as exc:  # the champion was trained on other data: the masks still follow
        click.echo(f"not registered: {exc}")
    images, _ = cfg.split_dirs("test")
    written = infer_folder(result.model, images, result.output_dir / "infer", palette=cfg.palette(),
                           threshold=cfg.infer.threshold, colorize_masks=True, overlays=True)
    click.echo(f"wrote {len(written)} masks to {result.output_dir / 'infer'}")
    click.echo("browse the runs: seg-mlops ui  (then http://127.0.0.1:5000)")


@cli.command("convert-config")
@click.argument("legacy_config", type=click.Path(dir_okay=False))
@click.option("--relative-to", type=click.Path(file_okay=False), default=None,
              help="Write paths relative to this folder (where the YAML will live, e.g. configs) "
                   "[default: absolute paths].")
def convert_config(legacy_config: str, relative_to: str | None) -> None:
    """Print our YAML for a reference train_eval_infer.config; notes go to stderr.

    Unknown, malformed or unsupported keys are errors naming file:line [section] key.
    """
    from seg_mlops import legacy

    conversion = legacy.convert(legacy_config)
    legacy.report(conversion.notes)
    click.echo(legacy.to_yaml(conversion, relative_to), nl=False)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (loopback unless you say so).")
@click.option("--port", default=5000, show_default=True)
def ui(host: str, port: int) -> None:
    """Start the MLflow UI/server over the project's tracking store (tracking/), artifacts proxied."""
    import sys

    from seg_mlops import servers, tracking

    store = tracking.tracking_uri()
    if not store.startswith(("sqlite:", "postgresql", "mysql")):
        raise SegMlopsError(f"MLFLOW_TRACKING_URI={store} is a server already; open it in a browser")
    if store.startswith("sqlite:///"):
        Path(store.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    from seg_mlops.config import redact

    artifacts = tracking.artifacts_home()
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    click.echo(f"MLflow UI on {base} (store {redact(store)}); Ctrl-C stops it")
    click.echo("in the model-training view (or click 'Model training' at the top left once):")
    from seg_mlops import run_page

    for name, url in run_page.training_view_links(store, base):
        click.echo(f"  {name}: {url}")
    sys.stdout.flush()  # the links before the server's own lines, in a log too
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", store,
           "--artifacts-destination", str(artifacts), "--host", host, "--port", str(port)]
    # MLflow's GenAI job runner starts seven extra worker processes that seg_mlops never uses;
    # without them the UI starts in a fraction of the time. MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true
    # brings them back.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    raise SystemExit(servers.serve(cmd, env))  # stopping the command stops uvicorn and its workers too


def main() -> None:
    cli(prog_name="seg-mlops")


if __name__ == "__main__":
    main()
