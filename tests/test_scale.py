"""Scale on TensorFlow's engines, for real on CPU: MirroredStrategy over 2 logical CPU devices,
a 2-process MultiWorkerMirroredStrategy cluster on 127.0.0.1, mixed precision (bfloat16 numerics
on CPU), XLA and steps_per_execution. Strategies that must be set up before TensorFlow starts run
in subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import yaml

from seg_mlops import config, data, train, tracking
from seg_mlops.errors import SegMlopsError
from seg_mlops.model import build_unet

from .conftest import REPO, TINY

LOGGED = {"loss", "val_loss", "dice_coef", "val_dice_coef", "iou_coef", "val_iou_coef", "image_dice",
          "val_image_dice", "lr", "epoch_seconds", "best_val_dice_coef", "test_dice_coef"}


def python_env(tracking_store: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": tracking_store,
            "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def runs_of(experiment: str, tracking_store: str) -> list:
    mlflow.set_tracking_uri(tracking_store)
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def image_steps(run_id: str) -> list[str]:
    """`<key>@<step>` of every epoch_infer image logged to the run (one picture per epoch)."""
    pngs = [a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "images") if a.path.endswith(".png")]
    return sorted(p.split("~")[1].split("+step+")[0] + "@" + p.split("+step+")[1].split("+")[0] for p in pngs)


# ----------------------------------------------------------------------------- no TensorFlow needed

@pytest.mark.parametrize("tf_config, chief", [
    ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}, True),
    ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}, False),
    ({"cluster": {"chief": ["c:1"], "worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}, True),
    ({"cluster": {"chief": ["c:1"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}, False),
])
def test_chief_is_tensorflows_chief(tf_config, chief, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
    assert train.is_chief(config.load(None, ["train.distribute=multi_worker"])) is chief
    assert train.is_chief(config.load(None)) is True  # TF_CONFIG only matters for multi_worker


@pytest.mark.parametrize("value, message", [
    ("", "needs the TF_CONFIG environment variable"),
    ("{not json", "is not valid: expected JSON like"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}', "is not in its cluster"),
])
def test_bad_tf_config_is_one_clear_error(value, message, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", value)
    with pytest.raises(SegMlopsError, match=message):
        train.is_chief(config.load(None, ["train.distribute=multi_worker"]))


def test_bare_on_off_in_yaml_are_the_choices_not_booleans(tmp_path):
    # YAML 1.1 reads `jit_compile: off` as False: the on/off keys take it as the word meant.
    path = tmp_path / "c.yaml"
    path.write_text("train: {jit_compile: off}\ndata: {cache: off}\n")
    cfg = config.load(path, ["train.jit_compile=on"])
    assert (cfg.train.jit_compile, cfg.data.cache) == ("on", "off")
    with pytest.raises(SegMlopsError, match="train.mixed_precision=True: expected a string"):
        config.load(None, ["train.mixed_precision=true"])


# ----------------------------------------------------------------------------- data

def test_datasets_shard_by_data_and_take_the_global_batch(tiny_cfg):
    import tensorflow as tf

    train_ds, valid_ds = data.make_datasets(tiny_cfg(), batch_size=8)
    for ds in (train_ds, valid_ds):
        assert ds.options().experimental_distribute.auto_shard_policy == tf.data.experimental.AutoShardPolicy.DATA
    # 8 train pairs in one global batch of 8 (train.batch_size=4 x 2 replicas); 4 valid pairs.
    assert [int(x.shape[0]) for x, _ in train_ds] == [8]
    assert [int(x.shape[0]) for x, _ in valid_ds] == [4]


# ----------------------------------------------------------------------------- mixed precision

def test_bfloat16_model_dtypes_and_numerics():
    kwargs = dict(image_height=32, image_width=32, base_filters=4, num_layers=3, dropout_rate=0.0)
    with train.precision("mixed_bfloat16"):
        mixed = build_unet(**kwargs)
    assert keras.mixed_precision.global_policy().name == "float32"  # restored for everyone else
    conv = mixed.get_layer("enc0_conv1")
    assert (conv.compute_dtype, conv.variable_dtype) == ("bfloat16", "float32")  # float32 master weights
    for name in ("rescale", "head"):
        assert mixed.get_layer(name).compute_dtype == "float32"
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    out = mixed.predict_on_batch(x)
    assert out.dtype == np.float32 and out.shape == (2, 32, 32, 1)
    # The same weights computed in float32: bfloat16 keeps 8 bits of mantissa (relative error
    # ~0.4 % per rounding), so probabilities agree to a few 1e-3, far below any threshold's margin.
    reference = build_unet(**kwargs)
    reference.set_weights(mixed.get_weights())
    diff = np.abs(out - reference.predict_on_batch(x))
    assert 0 < diff.max() < 0.02, diff.max()


def test_mixed_float16_gets_keras_loss_scaling(tiny_cfg):
    cfg = tiny_cfg("train.mixed_precision=mixed_float16")
    with train.precision(cfg.train.mixed_precision):
        model = build_unet(image_height=32, image_width=32, base_filters=4, num_layers=3)
    train.compile_model(model, cfg)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.optimizer.inner_optimizer.clipvalue == 0.5  # train.clipvalue still applies


def test_bfloat16_training_logs_a_float32_model(tiny_cfg, tracking_store):
    cfg = config.override(tiny_cfg("train.mixed_precision=mixed_bfloat16", "train.epochs=1"),
                          {"experiment": "scale-bf16"})
    result, run_id = tracking.train(cfg)
    assert np.isfinite(result.history["loss"]).all() and np.isfinite(result.history["val_loss"]).all()
    # The returned model, the checkpoint and the logged model compute in float32.
    assert result.model.get_layer("enc0_conv1").compute_dtype == "float32"
    reloaded = keras.models.load_model(result.model_path, compile=False)
    assert reloaded.get_layer("enc0_conv1").compute_dtype == "float32"
    logged = mlflow.pyfunc.load_model(mlflow.get_run(run_id).data.tags[tracking.MODEL_URI_TAG])
    x = np.full((2, 32, 32, 3), 128, np.float32)  # raw pixels
    out = np.asarray(logged.predict(x))
    assert out.dtype == np.float32 and out.shape == (2, 32, 32, 1)
    np.testing.assert_allclose(out, result.model.predict_on_batch(x), atol=1e-6)


class PrecisionProbe(keras.callbacks.Callback):
    """What the model being fitted really computes in: at the start of fit its policy, a conv's
    dtypes, the dtype a conv outputs and the optimizer; at the end its weights and predictions."""

    x = np.random.default_rng(3).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)

    def on_train_begin(self, logs=None):
        conv = self.model.get_layer("enc0_conv1")
        self.policy = self.model.dtype_policy.name
        self.conv = (conv.compute_dtype, conv.variable_dtype, str(conv.kernel.dtype))
        output = keras.Model(self.model.input, conv.output)(self.x[:1])
        self.conv_output = keras.backend.standardize_dtype(output.dtype)
        self.head = self.model.get_layer("head").compute_dtype
        self.optimizer = type(self.model.optimizer).__name__

    def on_train_end(self, logs=None):
        self.weights = [np.array(w) for w in self.model.get_weights()]
        self.pred = np.asarray(self.model.predict_on_batch(self.x))


def test_fit_in_mixed_float16_returns_a_float32_model(tiny_cfg):
    """A real fit with train.mixed_precision=mixed_float16 (Keras runs float16 on CPU too): the
    layers compute in float16 with float32 master weights and loss scaling during training; the
    result and the checkpoint are float32 models with those very weights."""
    probe = PrecisionProbe()
    cfg = tiny_cfg("train.mixed_precision=mixed_float16", "train.epoch_infer_count=0")
    result = train.train(cfg, verbose=0, extra_callbacks=[probe])
    assert probe.policy == "mixed_float16"
    assert probe.conv == ("float16", "float32", "float32") and probe.conv_output == "float16"
    assert probe.head == "float32" and probe.optimizer == "LossScaleOptimizer"
    assert len(result.history["loss"]) == 2 and np.isfinite(result.history["loss"]).all()
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after training
    for model in (result.model, keras.models.load_model(result.model_path, compile=False)):
        assert model.dtype_policy.name == "float32"
        assert {layer.compute_dtype for layer in model.layers} == {"float32"}
    # the float32 copy holds exactly the weights fit ended with (EarlyStopping's best: epoch 2 or 1)
    assert all(np.array_equal(a, b) for a, b in zip(result.model.get_weights(), probe.weights))
    # ... and computes them in float32: float16 (10-bit mantissa) differed by a rounding's worth
    diff = np.abs(result.model.predict_on_batch(probe.x) - probe.pred)
    assert 0 < diff.max() < 0.01, diff.max()


# ----------------------------------------------------------------------------- auto precision, threads

BF16_ONLY = {"fpu", "avx2", "avx512f", "avx512_bf16"}
AMX = {"avx2", "amx_tile", "amx_bf16", "amx_int8"}
PLAIN = {"fpu", "sse4_2", "avx2", "avx512f", "avx512_vnni"}  # AVX-512, but no bfloat16 arithmetic
A100, P100, GTX1080 = ("NVIDIA A100-SXM4-80GB", (8, 0)), ("Tesla P100", (6, 0)), ("GTX 1080", (6, 1))


@pytest.mark.parametrize("requested, flags, gpus, policy, why", [
    ("auto", BF16_ONLY, [], "mixed_bfloat16", "this CPU has avx512_bf16"),
    ("auto", AMX, [], "mixed_bfloat16", "this CPU has amx_bf16"),
    ("auto", BF16_ONLY | AMX, [], "mixed_bfloat16", "this CPU has amx_bf16 and avx512_bf16"),
    ("auto", PLAIN, [], "float32", "no native bfloat16"),
    ("auto", set(), [], "float32", "no native bfloat16"),  # no /proc/cpuinfo (not Linux)
    ("auto", PLAIN, [A100], "mixed_float16", "tensor cores on NVIDIA A100-SXM4-80GB (8.0)"),
    ("auto", BF16_ONLY, [A100], "mixed_float16", "tensor cores"),  # the GPU trains, not the CPU
    ("auto", BF16_ONLY, [GTX1080], "float32", "no tensor cores (compute capability < 7.0) on GTX 1080 (6.1)"),
    ("auto", PLAIN, [A100, P100], "float32", "on Tesla P100 (6.0)"),  # mirrored waits for the slowest
    ("mixed_float16", BF16_ONLY, [], "mixed_float16", "as configured"),  # explicit values are kept
    ("float32", BF16_ONLY, [A100], "float32", "as configured"),
])
def test_precision_auto_chooses_from_the_machine(requested, flags, gpus, policy, why):
    chosen, reason = train.resolve_precision(requested, flags, gpus)
    assert chosen == policy and why in reason


def test_cpu_flags_come_from_proc_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512_bf16\n"
                       "bugs\t\t: sysret_ss_attrs\n\nprocessor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert train.cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert train.cpu_flags(tmp_path / "missing") == set()
    assert train.resolve_precision("auto", train.cpu_flags(cpuinfo), [])[0] == "mixed_bfloat16"


def test_auto_precision_and_cache_are_decided_printed_and_tagged(tiny_cfg, capsys):
    cfg = config.override(tiny_cfg("train.mixed_precision=auto", "data.cache=auto", "train.epochs=1",
                                   "train.epoch_infer_count=0"), {"experiment": "scale-auto"})
    expected, why = train.resolve_precision("auto", train.cpu_flags(), train.visible_gpus())
    result, run_id = tracking.train(cfg)
    printed = capsys.readouterr().out
    assert f"precision: train.mixed_precision=auto -> {expected}: {why}" in printed
    # 8 train + 4 valid pairs at 32x32: 12 x 32 x 32 x 4 bytes = 48 KiB, far below any budget
    assert "cache: data.cache=auto -> memory: 12 decoded pairs at 32x32 take 0 MiB" in printed
    assert (result.cfg.train.mixed_precision, result.cfg.data.cache) == (expected, "memory")
    run = mlflow.get_run(run_id)
    assert run.data.tags[tracking.PRECISION_TAG] == expected and run.data.tags[tracking.CACHE_TAG] == "memory"
    # config.yaml (in the run and its folder) keeps what was asked (a resume compares it)
    logged = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml"))
    assert (logged["train"]["mixed_precision"], logged["data"]["cache"]) == ("auto", "auto")
    assert yaml.safe_load((result.output_dir / "config.yaml").read_text())["train"]["mixed_precision"] == "auto"
    assert result.model.get_layer("enc0_conv1").compute_dtype == "float32"  # a float32 model either way


def test_threads_are_set_before_tensorflow_starts(tmp_path):
    """train.threads=3: 3 intra-op and 2 inter-op threads, and a tf.data pool of 3 (read back from
    TensorFlow in a fresh process: the test process has started TensorFlow already)."""
    script = textwrap.dedent("""
        import tensorflow as tf
        from seg_mlops import config, data, train
        cfg = config.load(None, ["train.threads=3"])
        note = train.apply_threads(cfg.train.threads)
        tf.constant(1.0) + 1  # the runtime starts with the pools set above
        print(repr(note), tf.config.threading.get_intra_op_parallelism_threads(),
              tf.config.threading.get_inter_op_parallelism_threads(),
              data.pipeline_options(cfg).threading.private_threadpool_size,
              data.pipeline_options(config.load(None, [])).threading.private_threadpool_size)
        print(repr(train.apply_threads(3)), repr(train.apply_threads(0)))  # unchanged: no note
        print(train.apply_threads(1))  # other sizes after the start: a note, not a crash
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=python_env(f"sqlite:///{tmp_path}/m.db"))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "'' 3 2 3 None"
    assert lines[1] == "'' ''"
    assert lines[2] == ("note: train.threads=1 not applied: TensorFlow's runtime had started in this process "
                        "with 3 intra-op and 2 inter-op threads, which cannot change now; start a new process "
                        "to use other thread counts")


# ----------------------------------------------------------------------------- XLA, steps per execution

def test_jit_compile_and_steps_per_execution(tiny_cfg, tmp_path):
    def fit(*overrides: str):
        keras.backend.clear_session()
        cfg = tiny_cfg("train.epoch_infer_count=0", f"train.output_dir={tmp_path / '_'.join(overrides)}",
                       *overrides)
        return train.train(cfg, verbose=0)

    base = fit("train.jit_compile=off")
    xla = fit("train.jit_compile=on")
    grouped = fit("train.jit_compile=off", "train.steps_per_execution=2")
    assert (base.model.jit_compile, xla.model.jit_compile) == (False, True)
    assert grouped.model.steps_per_execution == 2
    for result in (base, xla, grouped):
        assert set(result.history) == set(base.history)
        assert all(len(v) == 2 and np.isfinite(v).all() for v in result.history.values())
    # 8 pairs in 2 batches per epoch: 2 steps per execution run the same 2 updates in one call,
    # so the numbers match; XLA fuses ops differently, so only to float tolerance.
    np.testing.assert_allclose(grouped.history["loss"], base.history["loss"], rtol=1e-4)
    np.testing.assert_allclose(xla.history["loss"], base.history["loss"], rtol=1e-2)


# ----------------------------------------------------------------------------- strategies (subprocesses)

def test_keras_internals_patched_for_multi_worker_are_still_there():
    # train._keras_multi_worker_fixes patches these private Keras functions/attributes, which is
    # why setup.cfg pins Keras to one minor. If this fails, Keras changed them: re-check
    # keras-team/keras#20585 (maybe fixed: delete the workaround) before moving the pin.
    import inspect

    from keras.src.backend.tensorflow import trainer as tf_trainer

    advice = (f"Keras {keras.__version__} changed what train._keras_multi_worker_fixes patches: "
              "re-check keras-team/keras#20585 before moving the keras pin in setup.cfg")
    assert list(inspect.signature(tf_trainer.reduce_per_replica).parameters) == \
        ["values", "strategy", "reduction"], advice
    assert callable(getattr(tf_trainer, "_collective_all_reduce_multi_worker", None)), advice
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    assert hasattr(model, "_distribute_strategy"), advice


MIRRORED = """
import sys
import tensorflow as tf
# Two logical CPU devices: must be set before TensorFlow initialises its devices.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
from seg_mlops import config, tracking
for distribute in ("none", "mirrored"):
    cfg = config.load(sys.argv[1], [f"train.distribute={distribute}", f"train.output_dir={sys.argv[2]}/{distribute}"])
    result, run_id = tracking.train(cfg)
    print("RUN", distribute, run_id, result.replicas)
"""


@pytest.fixture
def tiny_yaml(binary_root, tmp_path):
    def write(experiment: str, *overrides: str) -> Path:
        flat = config.parse_overrides([*TINY, "train.epochs=1", f"data.root={binary_root}",
                                       f"train.output_dir={tmp_path / 'out'}", *overrides])
        nested: dict = {"experiment": experiment}
        for key, value in flat.items():
            section, name = key.split(".")
            nested.setdefault(section, {})[name] = value
        path = tmp_path / f"{experiment}.yaml"
        path.write_text(yaml.safe_dump(nested))
        return path
    return write


def test_mirrored_over_two_logical_cpus_logs_like_a_plain_run(tiny_yaml, tmp_path, tracking_store):
    path = tiny_yaml("scale-mirrored", "train.epochs=2")
    proc = subprocess.run([sys.executable, "-c", MIRRORED, str(path), str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env=python_env(tracking_store), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {line.split()[1]: (line.split()[2], int(line.split()[3]))
            for line in proc.stdout.splitlines() if line.startswith("RUN ")}
    assert runs["none"][1] == 1 and runs["mirrored"][1] == 2
    client = mlflow.MlflowClient(tracking_store)
    plain, mirrored = (client.get_run(runs[k][0]) for k in ("none", "mirrored"))
    assert mirrored.info.status == "FINISHED"
    assert set(mirrored.data.metrics) == set(plain.data.metrics) and LOGGED <= set(mirrored.data.metrics)
    assert mirrored.data.tags["seg_mlops.global_batch_size"] == "8"  # 4 per replica x 2
    for name in ("loss", "val_dice_coef", "lr"):
        assert [m.step for m in client.get_metric_history(mirrored.info.run_id, name)] == [0, 1]
    # One picture of the panels per epoch (2 epochs), exactly as the plain run.
    expected = [f"input-truth-prediction@{e}" for e in range(2)]
    assert image_steps(mirrored.info.run_id) == image_steps(plain.info.run_id) == expected


def test_multi_worker_two_processes_one_chief_run(tiny_yaml, tmp_path, tracking_store):
    experiment = "scale-multi-worker"
    path = tiny_yaml(experiment, "train.distribute=multi_worker")
    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_ports(2)]}
    procs = []
    for index in range(2):
        env = python_env(tracking_store, TF_CONFIG=json.dumps({"cluster": cluster,
                                                               "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen([sys.executable, "-m", "seg_mlops.cli", "train", "--config", str(path)],
                                      env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    try:
        outputs = [p.communicate(timeout=540) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "MLflow run" in outputs[0][0] and "worker done after 1 epochs" in outputs[1][0]
    runs = runs_of(experiment, tracking_store)
    assert len(runs) == 1  # the chief's only
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["seg_mlops.replicas"] == "2"
    assert LOGGED <= set(run.data.metrics)
    assert image_steps(run.info.run_id) == ["input-truth-prediction@0"]
    # Only the chief writes the output folder; the worker's temporary folder is gone.
    out = tmp_path / "out"
    assert (out / "best_model.keras").is_file() and len(list((out / "epoch_infer").glob("*.png"))) == 2
