"""Training: data + model + loss -> compiled Keras fit with plain Keras callbacks.

Knows nothing of MLflow or Optuna: they join through `panel_logger` (the tracking layer's
logging callback, given the epoch-inference panels) and `extra_callbacks` (the tuner's pruning
callback). The monitored metric (`train.monitor`) is the one
name that checkpointing, early stopping and the LR reducer share.

Scale comes from TensorFlow's own engines: a tf.distribute strategy (`train.distribute`), a Keras
mixed-precision policy (`train.mixed_precision`), XLA (`train.jit_compile`) and several batches
per compiled step (`train.steps_per_execution`). Whatever was used to train, the returned model
(and best_model.keras) is a plain float32 model outside any strategy: it loads and predicts
anywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import keras

from seg_mlops import config as config_mod
from seg_mlops import data, dataset_profile, losses
from seg_mlops import resume as resume_mod
from seg_mlops.callbacks import EpochInference, EpochPanels, HistoryWriter
from seg_mlops.epoch_clock import TimeBudget
from seg_mlops.config import Config
from seg_mlops.errors import SegMlopsError
from seg_mlops.model import build_unet
from seg_mlops.model_writer import ModelWriter

MODEL_FILE = "best_model.keras"
PROFILE_FILE = "dataset_profile.json"
JIT_COMPILE = {"auto": "auto", "on": True, "off": False}  # train.jit_compile -> Model.compile


@dataclass
class TrainResult:
    output_dir: Path
    model_path: Path  # the best checkpoint on train.monitor
    history: dict[str, list[float]]
    model: keras.Model  # with the best weights restored
    epoch_inference: EpochInference | None
    replicas: int = 1  # devices that trained in sync (all workers); global batch = batch_size x this
    # the config as trained: data.binary_mask, data.cache and train.mixed_precision decided
    cfg: Config | None = None
    profile: data.Profile | None = None  # what the validation pass saw (dataset_profile.json)


def learning_rate(cfg: Config, steps_per_epoch: int):
    """Adam's learning rate: train.learning_rate as is ("plateau": the reducer may cut it), or a
    per-step schedule ("cosine"): linear warm-up from 0 over train.warmup_epochs, then a cosine
    from train.learning_rate down to 0 at the end of train.epochs. The schedule is a function of
    the optimizer's step count, which checkpoints and the resume state keep: a resumed run goes on
    where it was."""
    t = cfg.train
    if t.lr_schedule == "plateau":
        return t.learning_rate
    warmup = t.warmup_epochs * steps_per_epoch
    decay = (t.epochs - t.warmup_epochs) * steps_per_epoch
    if not warmup:
        return keras.optimizers.schedules.CosineDecay(t.learning_rate, decay)
    return keras.optimizers.schedules.CosineDecay(0.0, decay, warmup_target=t.learning_rate, warmup_steps=warmup)


def compile_model(model: keras.Model, cfg: Config, steps_per_epoch: int = 1) -> list[str]:
    """Compile with Adam(learning_rate(cfg, steps_per_epoch), clipvalue) and the task's
    loss/metrics; returns the metric names Keras will log (and checks that train.monitor is one of
    them).

    Call it inside the strategy's scope (the optimizer's variables live there). Under the
    mixed_float16 policy Keras wraps the optimizer in a LossScaleOptimizer by itself (its
    `auto_scale_loss`); bfloat16 has float32's range and needs no loss scaling.
    """
    loss, metrics = losses.for_task(cfg.model.num_classes, cfg.train.loss, cfg.train.metrics)
    optimizer = keras.optimizers.Adam(learning_rate=learning_rate(cfg, steps_per_epoch),
                                      clipvalue=cfg.train.clipvalue or None)
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics,
                  jit_compile=JIT_COMPILE[cfg.train.jit_compile],
                  steps_per_execution=cfg.train.steps_per_execution)
    build_training_state(model)
    names = [losses.metric_name(m) for m in metrics]
    logged = ["loss", "val_loss"] + names + ["val_" + n for n in names]
    if cfg.train.monitor not in logged:
        raise SegMlopsError(f"train.monitor={cfg.train.monitor!r} is not a logged metric; "
                            f"choose one of {', '.join(logged)}")
    return names


def build_training_state(model: keras.Model) -> None:
    """Create the optimizer's, the loss trackers' and the metrics' variables now, symbolically.

    Keras otherwise creates them inside the first traced train step, and TensorFlow traces a
    function that creates variables twice: 1.9 s for the first step of a 64 px, 4-level UNet
    against 0.9 s (this 0.1 s included) when they exist (bench/README.md, tuning.py), a second
    that every training and every trial of a study paid. Keras does this itself under a
    distribution strategy (its fit calls `_maybe_symbolic_build`); keras is pinned to one minor
    for such calls (setup.cfg). Images and masks are float32 shaped as the model's input and output
    (data.make_dataset)."""
    batch = (keras.KerasTensor(model.input_shape), keras.KerasTensor(model.output_shape))
    model._symbolic_build(data_batch=batch)


# ----------------------------------------------------------------------------- scale

def is_chief(cfg: Config) -> bool:
    """Whether this process writes outputs and logs: always, except for a non-chief worker of a
    multi_worker run. The chief is the task of type "chief", or worker 0 when the cluster has no
    "chief" (TensorFlow's own convention).

    Args:
        cfg: the experiment config (train.distribute decides whether TF_CONFIG matters).
    """
    if cfg.train.distribute != "multi_worker":
        return True
    kind, index, cluster = _tf_config()
    return kind == "chief" or (kind == "worker" and index == 0 and "chief" not in cluster)


def _tf_config() -> tuple[str, int, dict]:
    """(task type, task index, cluster as {job: addresses}) of TF_CONFIG, read by TensorFlow's own
    TFConfigClusterResolver, or one clear error saying how to set it."""
    import tensorflow as tf

    raw = os.environ.get("TF_CONFIG", "")
    example = ('TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
               '"task": {"type": "worker", "index": 0}}\'')
    if not raw.strip():
        raise SegMlopsError(f"train.distribute=multi_worker needs the TF_CONFIG environment variable on every "
                            f"worker, e.g. {example} (index 1 on the second host)")
    invalid = SegMlopsError(f"TF_CONFIG={raw!r} is not valid: expected JSON like {example}")
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    try:
        kind, index, cluster = resolver.task_type, resolver.task_id or 0, resolver.cluster_spec().as_dict()
    except (ValueError, KeyError, TypeError, AttributeError):
        raise invalid from None
    if kind is None or not cluster:
        raise invalid
    if kind not in ("chief", "worker") or not 0 <= index < len(cluster.get(kind, [])):
        raise SegMlopsError(f"TF_CONFIG task {{'type': {kind!r}, 'index': {index}}} is not in its cluster "
                            f"{cluster}: give type chief or worker and an index below its list's length")
    return kind, index, cluster


def strategy(cfg: Config):
    """The tf.distribute strategy of train.distribute.

    "none": TensorFlow's default strategy (one device). "mirrored": every GPU of this machine, or
    every logical CPU device when there is no GPU (one, unless the CPU was split with
    tf.config.set_logical_device_configuration). "multi_worker": MultiWorkerMirroredStrategy over
    the cluster in TF_CONFIG; it must be created before TensorFlow starts its runtime, which is
    why train() creates it first.

    Args:
        cfg: the experiment config.
    """
    import tensorflow as tf

    kind = cfg.train.distribute
    if kind == "none":
        return tf.distribute.get_strategy()
    if kind == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy(devices=[d.name for d in devices])
    _tf_config()  # a clear error before TensorFlow's own
    return tf.distribute.MultiWorkerMirroredStrategy()


def resolve_precision(requested: str, cpu_flags: set[str], gpus: Sequence[tuple[str, tuple[int, int]]]
                      ) -> tuple[str, str]:
    """The Keras dtype policy for train.mixed_precision, and why: `requested` unless it is
    "auto"; then mixed_float16 when there are GPUs and every one has tensor cores (compute
    capability 7.0 or more: Volta and later), float32 when there are GPUs without, and on a
    CPU-only machine mixed_bfloat16 when the CPU computes bfloat16 natively (AVX512_BF16 or AMX;
    oneDNN then runs bfloat16 convolutions about twice as fast as float32, bench/train_speed.py),
    float32 otherwise (emulated bfloat16 is slower than float32).

    Args:
        requested: train.mixed_precision.
        cpu_flags: the CPU's feature flags, as /proc/cpuinfo lists them (`cpu_flags`).
        gpus: (name, compute capability) of each visible GPU (`visible_gpus`).
    """
    if requested != "auto":
        return requested, "as configured"
    if gpus:
        slow = [f"{name} ({major}.{minor})" for name, (major, minor) in gpus if (major, minor) < (7, 0)]
        if slow:
            return "float32", f"no tensor cores (compute capability < 7.0) on {', '.join(slow)}"
        return "mixed_float16", f"tensor cores on {', '.join(f'{n} ({a}.{b})' for n, (a, b) in gpus)}"
    native = sorted({"avx512_bf16", "amx_bf16"} & set(cpu_flags))
    if native:
        return "mixed_bfloat16", f"no GPU, and this CPU has {' and '.join(native)}"
    return "float32", "no GPU, and this CPU has no native bfloat16 (avx512_bf16 or amx_bf16)"


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags of the first "flags" line of /proc/cpuinfo (empty where there is none,
    e.g. not on Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def visible_gpus() -> list[tuple[str, tuple[int, int]]]:
    """(name, compute capability) of each GPU TensorFlow sees; listing them does not start the
    runtime (threads and strategies can still be set after)."""
    import tensorflow as tf

    found = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        found.append((details.get("device_name", gpu.name), tuple(details.get("compute_capability", (0, 0)))))
    return found


def decide_precision(cfg: Config) -> Config:
    """train.mixed_precision "auto" resolved on this machine (`resolve_precision`), with one
    printed line saying what was chosen and why; other values are kept."""
    if cfg.train.mixed_precision != "auto":
        return cfg
    policy, why = resolve_precision("auto", cpu_flags(), visible_gpus())
    print(f"precision: train.mixed_precision=auto -> {policy}: {why}")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mixed_precision=policy))


def apply_threads(threads: int) -> str:
    """Give TensorFlow train.threads: n intra-op threads (one op's parallel work: the
    convolutions) and min(2, n) inter-op threads (independent ops at once; Intel's guidance for
    oneDNN is one per socket, and a UNet's graph is mostly one chain); 0 keeps TensorFlow's
    defaults (both pools as large as the machine). The pipeline's share is tf.data's option
    (data.pipeline_options). Returns "" or a note: the pools are fixed once TensorFlow's runtime
    has started in this process (a second training in the same process, a test), and asking for
    other sizes then is not an error: training runs with the pools it has.
    """
    import tensorflow as tf

    if not threads:
        return ""
    wanted = (threads, min(2, threads))
    have = (tf.config.threading.get_intra_op_parallelism_threads(),
            tf.config.threading.get_inter_op_parallelism_threads())
    if have == wanted:
        return ""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(wanted[0])
        tf.config.threading.set_inter_op_parallelism_threads(wanted[1])
    except RuntimeError:  # "... cannot be modified after initialization"
        return (f"note: train.threads={threads} not applied: TensorFlow's runtime had started in this process "
                f"with {have[0] or 'default'} intra-op and {have[1] or 'default'} inter-op threads, which "
                "cannot change now; start a new process to use other thread counts")
    return ""


@contextlib.contextmanager
def precision(policy: str) -> Iterator[None]:
    """Set the Keras global dtype policy for the layers built inside, then restore the previous
    one: the policy is global state, and later models (evaluation copies, other runs in the same
    process) must not inherit it. Layers keep the policy they were built with.

    Args:
        policy: "float32", "mixed_float16" or "mixed_bfloat16".
    """
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def plain_copy(model: keras.Model, cfg: Config) -> keras.Model:
    """The same UNet and weights, float32 and outside any strategy scope. The variables of a
    mixed-precision model are float32 already, so nothing is rounded; the copy predicts without
    collective ops (which on a multi-worker cluster would wait for the other workers) and
    serves on any machine.

    Args:
        model: the trained model.
        cfg: the config it was built from.
    """
    with precision("float32"):
        copy = build_unet(**dataclasses.asdict(cfg.model))
    copy.set_weights(model.get_weights())
    return copy


def prepare_output(cfg: Config, overwrite: bool, resume: bool = False) -> Path:
    """The output folder, refusing to reuse one that holds a previous training unless asked:
    nothing is ever wiped (the reference rmtree'd its folders). A fresh start drops the resume
    state a killed training left there; a resume keeps it."""
    out = cfg.output_dir
    if (out / MODEL_FILE).exists() and not overwrite and not resume:
        raise SegMlopsError(f"{out} already holds a trained model; pass --overwrite to replace its files "
                            f"or choose another folder with --set train.output_dir=...")
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        resume_mod.clear_state(out)
    (out / "config.yaml").write_text(config_mod.to_yaml(config_mod.public(cfg)))  # no storage password
    return out


def progress_verbosity() -> int:
    """Keras fit verbosity for where stdout goes: 1 (the progress bar, redrawn in place) in a
    terminal, 2 (one line per epoch) in a file or pipe, where a bar would be a line per step."""
    return 1 if sys.stdout.isatty() else 2


def train(cfg: Config, *, extra_callbacks: Sequence[keras.callbacks.Callback] = (),
          panel_logger: Callable[[EpochPanels, Callable[[int], None]], keras.callbacks.Callback] | None = None,
          overwrite: bool = False, verbose: int | None = None, resume: bool = False, owner: str = "") -> TrainResult:
    """Validate the data, build and compile the UNet, fit, and keep the best checkpoint.

    Every epoch also saves the training state to `<output>/resume/` (see seg_mlops.resume).

    Args:
        cfg: the experiment config.
        extra_callbacks: appended after ours and the panel logger.
        panel_logger: makes the callback that logs the epoch-inference panels, given the run's
            EpochPanels and `saved(epoch)`, which blocks until that epoch's training state is on
            disk (the tracking layer's MLflowLogger, whose uploader publishes no epoch before it);
            it is placed after them, so it sees each epoch's panels in its on_epoch_end.
        overwrite: reuse an output folder that already holds a model.
        verbose: Keras fit verbosity; default `progress_verbosity()`: Keras' progress bar in a
            terminal, one line per epoch otherwise (logs, CI, `mlflow run` captured output).
        resume: continue from the state saved in the output folder (model, optimizer, epoch, LR,
            early-stopping, LR-reducer and checkpoint state, history rows); a fresh start when no
            epoch ended there yet.
        owner: who trains (the MLflow run id), saved in the state; resuming a state saved by
            another owner is an error.
    """
    # First, before TensorFlow's runtime starts: thread pools, then the strategy
    # (MultiWorkerMirroredStrategy must precede the runtime too).
    note = apply_threads(cfg.train.threads)
    if note:
        print(note, file=sys.stderr)
    distribution = strategy(cfg)
    chief = is_chief(cfg)
    if not chief:
        cfg = _scratch_output(cfg)
    # config.yaml keeps the config as asked (data.binary_mask, data.cache, train.mixed_precision:
    # auto), as the run's params do: a resume compares the two. The decisions are printed, in
    # dataset_profile.json and in the run's tags (TrainResult.cfg holds them).
    out_cfg = cfg
    cfg = decide_precision(cfg)
    keras.utils.set_random_seed(cfg.seed)  # Python, NumPy and TF at once (the reference's B1)
    # Cheap checks first (model shape, loss and monitor names, every data file), so bad input
    # fails in seconds and before the output folder is touched.
    # train.batch_size is per replica: each step takes batch_size x replicas images in all.
    global_batch = cfg.train.batch_size * distribution.num_replicas_in_sync
    with precision(cfg.train.mixed_precision), distribution.scope():
        model = build_unet(**dataclasses.asdict(cfg.model))
        # (only a cosine schedule needs the epoch's length, and it lists the files to know it)
        metric_names = compile_model(model, cfg, epoch_steps(cfg, global_batch)[0]
                                     if cfg.train.lr_schedule == "cosine" else 1)
    cfg, profile = data.prepare(cfg)  # every file checked, mask encoding decided, foreground present
    profile = dataclasses.replace(profile, shape=dataset_profile.describe(cfg))  # sizes, objects
    cfg = data.decide_cache(cfg)
    datasets = data.make_datasets(cfg, batch_size=global_batch, repeat=True)  # one iterator for all epochs
    steps = epoch_steps(cfg, global_batch)
    out = prepare_output(out_cfg, overwrite, resume)
    (out / PROFILE_FILE).write_text(profile.to_json())
    state = _load_state(out, resume, owner)
    panels = EpochPanels.from_config(cfg, out)
    # Written off the training thread by a shadow model that takes the policy it is created under.
    with precision(cfg.train.mixed_precision):
        writer = ModelWriter(model)
    callbacks = _callbacks(cfg, out, metric_names, panels, writer)
    # Last of ours: it saves what the callbacks above updated, before the others publish it.
    saver = resume_mod.TrainingState(out, callbacks, out / MODEL_FILE, writer, owner=owner, state=state)
    if state is not None and state.complete:
        # Fit had ended before the interruption: only the tracked end (evaluation, logging) is left.
        writer.close()
        model.load_weights(out / MODEL_FILE)  # what EarlyStopping restores / the best checkpoint
        model = plain_copy(model, cfg) if _converted(cfg) else model
    else:
        with contextlib.closing(writer):  # the epochs that ended are on disk, even after an error
            if state is not None:
                _restore(model, out, callbacks, state, cfg.train.epochs)
            loggers = [panel_logger(panels, saver.wait_saved)] if panel_logger is not None else []
            _fit(model, cfg, distribution, datasets, steps, [*callbacks, saver, *loggers, *extra_callbacks],
                 state.epoch if state else 0, progress_verbosity() if verbose is None else verbose)
        model = _finish(model, cfg, out, chief)
    if not chief:
        shutil.rmtree(out, ignore_errors=True)
    # The history of both segments of a resumed training, from the saved rows.
    return TrainResult(out, out / MODEL_FILE, resume_mod.history(saver.state.rows), model, panels.inference,
                       distribution.num_replicas_in_sync, cfg, profile)


def epoch_steps(cfg: Config, global_batch: int) -> tuple[int, int]:
    """Train and validation batches per epoch."""
    return (data.steps(data.split_pairs(cfg, "train"), global_batch),
            data.steps(data.split_pairs(cfg, "valid"), global_batch))


def _scratch_output(cfg: Config) -> Config:
    """The config writing to a fresh temporary folder, which train() deletes at the end: a
    non-chief worker writes its checkpoints and files there, so that only the chief writes to the
    output folder (TensorFlow's multi-worker pattern)."""
    return config_mod.override(cfg, {"train.output_dir": tempfile.mkdtemp(prefix="seg-mlops-worker-")})


def _load_state(out: Path, resume: bool, owner: str) -> resume_mod.State | None:
    """The training state to continue from (None: a fresh start); one saved by another owner is
    an error."""
    state = resume_mod.load_state(out) if resume else None
    if state is not None and owner and state.owner and state.owner != owner:
        raise SegMlopsError(f"{out / resume_mod.STATE_DIR} holds the training state of run {state.owner}, not "
                            f"{owner}: resume that run, or train afresh with --overwrite")
    return state


def _callbacks(cfg: Config, out: Path, metric_names: Sequence[str], panels: EpochPanels,
               writer: ModelWriter) -> list[keras.callbacks.Callback]:
    """Ours, in order: the best checkpoint on train.monitor, the LR reducer, early stopping and
    the time budget when configured, the history files, then the epoch-inference panels (the
    reference's epoch_change_infer and epoch_change_tiledinfer)."""
    monitor, mode = cfg.train.monitor, losses.monitor_mode(cfg.train.monitor)
    callbacks: list[keras.callbacks.Callback] = [resume_mod.BestCheckpoint(out / MODEL_FILE, monitor, mode, writer)]
    if cfg.train.reducer_patience and cfg.train.lr_schedule == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            monitor=monitor, mode=mode, factor=cfg.train.reducer_factor,
            patience=cfg.train.reducer_patience, verbose=1))
    if cfg.train.patience:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=monitor, mode=mode, patience=cfg.train.patience, restore_best_weights=True, verbose=1))
    if cfg.train.max_minutes:
        callbacks.append(TimeBudget(cfg.train.max_minutes))
    # After the callbacks that stop fit: it draws its plots at the last epoch.
    return callbacks + [HistoryWriter(out, metric_names)] + panels.callbacks()


def _restore(model: keras.Model, out: Path, callbacks: Sequence[keras.callbacks.Callback],
             state: resume_mod.State, epochs: int) -> None:
    """Put the weights and the history writers back where the saved state left them (the
    TrainingState callback restores the optimizer's and the other callbacks' state)."""
    resume_mod.restore_weights(model, out, state)
    restore_history_rows(callbacks, state.rows)
    print(f"resuming from epoch {state.epoch + 1} of {epochs} (state in {out / resume_mod.STATE_DIR})")


def _fit(model: keras.Model, cfg: Config, distribution, datasets, steps: tuple[int, int],
         callbacks: Sequence[keras.callbacks.Callback], initial_epoch: int, verbose: int) -> None:
    """Keras fit under the strategy, from `initial_epoch` to train.epochs, on repeated pipelines
    (`steps`: train and validation batches per epoch), so Keras keeps one iterator each."""
    train_ds, valid_ds = datasets
    with distribution.scope(), _keras_multi_worker_fixes(model, cfg.train.distribute == "multi_worker"):
        model.fit(train_ds, validation_data=valid_ds, epochs=cfg.train.epochs, initial_epoch=initial_epoch,
                  steps_per_epoch=steps[0], validation_steps=steps[1],
                  callbacks=list(callbacks), verbose=verbose,
                  shuffle=False)  # the dataset shuffles itself (seeded)


def _finish(model: keras.Model, cfg: Config, out: Path, chief: bool) -> keras.Model:
    """The trained model with the best weights; a plain float32 copy when trained under a strategy
    or in mixed precision, which the chief also saves over the checkpoint (loadable anywhere)."""
    if not cfg.train.patience and (out / MODEL_FILE).exists():
        model.load_weights(out / MODEL_FILE)  # no EarlyStopping to restore the best weights
    if not _converted(cfg):
        return model
    model = plain_copy(model, cfg)
    if chief and (out / MODEL_FILE).exists():
        # A new file, not the checkpoint rewritten in place: the resume state may link it.
        saving = resume_mod.saving_path(out / MODEL_FILE)
        model.save(saving)
        os.replace(saving, out / MODEL_FILE)
    return model


def _converted(cfg: Config) -> bool:
    """Trained under a strategy or in mixed precision: the result is re-built as a plain float32 copy."""
    return cfg.train.distribute != "none" or cfg.train.mixed_precision != "float32"


def restore_history_rows(callbacks: Sequence[keras.callbacks.Callback], rows: list[dict]) -> None:
    """Give the history writers the rows of the epochs before a resume (their CSVs hold all)."""
    for callback in callbacks:
        if isinstance(callback, HistoryWriter):
            callback.rows = [dict(r) for r in rows]


@contextlib.contextmanager
def _keras_multi_worker_fixes(model: keras.Model, active: bool) -> Iterator[None]:
    """Work around keras-team/keras#20585: Keras 3 (3.15 here) cannot fit under
    MultiWorkerMirroredStrategy. Two places fail, both in how Keras reduces values across
    workers, not in TensorFlow's engine:
    1. `_maybe_symbolic_build` reduces a whole (images, masks) batch with `strategy.reduce`, which
       the collective strategy cannot do for a tuple: the model forgets the strategy it was built
       in (its variables were created in `strategy.scope()` already, the optimizer's are built
       here), so Keras takes the strategy from the enclosing scope and skips that step.
    2. `reduce_per_replica` averages the per-step scalar metrics with `axis=0`, which a scalar
       does not have: for a multi-worker mean we reduce with `axis=None` (a plain cross-worker mean).
    Both are undone on exit. Remove this when Keras fixes the issue.
    """
    if not active:
        yield
        return
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(strategy):
            return keras.tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    model.optimizer.build(model.trainable_variables)
    pinned, model._distribute_strategy = model._distribute_strategy, None
    tf_trainer.reduce_per_replica = reduce_per_replica
    try:
        yield
    finally:
        tf_trainer.reduce_per_replica = original
        model._distribute_strategy = pinned

