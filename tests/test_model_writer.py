"""The background model writer: a file holds the snapshot it was given, not the weights training
has moved on to; jobs run in order; a job's error reaches the training thread once; the MLflow
uploader publishes no epoch before its state is on disk."""

from __future__ import annotations

import threading
import weakref

import keras
import mlflow
import numpy as np
import pytest

from seg_mlops import spool
from seg_mlops.model_writer import ModelWriter


def tiny_model() -> keras.Model:
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs))
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    return model


def step(model: keras.Model) -> None:
    model.train_on_batch(np.ones((2, 4), "float32"), np.zeros((2, 2), "float32"))


def test_file_holds_the_snapshot_not_the_weights_trained_after_it(tmp_path):
    model = tiny_model()
    step(model)
    writer = ModelWriter(model)
    release = threading.Event()
    writer.submit(lambda shadow: release.wait(10), writer.snapshot())  # hold the worker
    snapshot = writer.snapshot()
    ticket = writer.submit(lambda shadow: shadow.save(tmp_path / "a.keras"), snapshot)
    step(model)  # training moves on before the worker saves
    assert writer.snapshot() is not snapshot  # a new step: a new copy
    release.set()
    writer.wait(ticket)
    writer.close()
    saved = keras.saving.load_model(tmp_path / "a.keras", compile=True)
    for got, want in zip(saved.get_weights(), snapshot.weights):
        np.testing.assert_array_equal(got, want)
    assert int(saved.optimizer.iterations) == 1  # the snapshot's Adam step, not the model's 2
    assert not np.array_equal(saved.get_weights()[0], model.get_weights()[0])


def test_one_copy_per_step_and_learning_rate():
    model = tiny_model()
    writer = ModelWriter(model)
    first = writer.snapshot()
    assert writer.snapshot() is first  # nothing changed: the callbacks of an epoch share it
    model.optimizer.learning_rate.assign(0.05)  # a reducer acted after the checkpoint's copy
    second = writer.snapshot()
    assert second is not first and second.key == (0, pytest.approx(0.05))
    writer.close()


def test_a_snapshot_is_let_go_once_it_is_in_the_shadow():
    # Its arrays share the variables' buffers: held, they make TensorFlow copy every variable at
    # the next step (and keep both in memory).
    writer = ModelWriter(tiny_model())
    snapshot = writer.snapshot()
    held = weakref.ref(snapshot)
    ticket = writer.submit(lambda shadow: None, snapshot)
    del snapshot
    writer.wait(ticket)
    assert held() is None
    writer.close()


def test_a_job_error_reaches_the_training_thread_once_and_stops_writing(tmp_path):
    writer = ModelWriter(tiny_model())
    ran = []

    def fail(shadow):
        raise OSError("No space left on device")

    ticket = writer.submit(fail, writer.snapshot())
    writer.wait(ticket)  # released by the failure
    with pytest.raises(OSError, match="No space left"):
        writer.submit(lambda shadow: ran.append(1), writer.snapshot())
    writer.close()  # reported already: not raised again
    assert ran == []


def test_uploader_waits_for_the_gate_of_each_step(tmp_path):
    client = mlflow.MlflowClient()  # the session's sqlite store (conftest)
    run_id = client.create_run(client.create_experiment("writer-gate")).info.run_id
    saved = {0: threading.Event(), 1: threading.Event()}
    sink = spool.RunSink(run_id, tmp_path / "out").gated(lambda epoch: saved[epoch].wait())
    saved[0].set()
    sink.log_metrics({"loss": 0.5}, step=0)
    sink.log_metrics({"loss": 0.25}, step=1)  # its state is not on disk yet
    assert sink.flush(timeout=3) == 1
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.5)]
    saved[1].set()
    assert sink.flush(timeout=30) == 0
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (1, 0.25)]
    sink.close()
