"""The bad-input matrix: each bad file, folder, key, URL or study, run through the real CLI in its
own process, must give one `Error:` line naming the culprit, exit code 1, no traceback, and leave
nothing half-written (no MLflow run left RUNNING, no output folder or model). RGBA and 16-bit
images are accepted by design (data.read_rgb converts them): those rows assert success and pixels.

`python -m pytest -q tests/test_bad_inputs.py -s -k table` prints the table "case -> what the
user sees" (the last stderr line of every case, from the run's own outputs).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import cv2
import mlflow
import numpy as np
import optuna
import pytest
import yaml

from seg_mlops import config, data, synthetic
from tests.conftest import TINY

# What the user saw in each case, collected for the report table (test_print_table).
SEEN: dict[str, str] = {}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("bad-inputs")
    return {"binary": synthetic.make_dataset(base / "binary", classes=1, size=32, counts=(4, 2, 2)),
            "multi": synthetic.make_dataset(base / "multi", classes=3, size=32, counts=(4, 2, 2))}


@dataclasses.dataclass
class Workspace:
    """One case's own copy of the dataset, its config and its output folder."""

    tmp: Path
    root: Path
    experiment: str
    multiclass: bool = False

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def config(self, extra: dict | None = None, raw: str | None = None) -> Path:
        """Write the tiny config (plus `extra` nested keys, or a raw text) and return its path."""
        path = self.tmp / "case.yaml"
        if raw is not None:
            path.write_text(raw)
            return path
        flat = config.parse_overrides(TINY + ["train.epochs=1", "train.patience=0"])
        nested: dict = {"experiment": self.experiment, "data": {"root": str(self.root)},
                        "train": {"output_dir": str(self.out)},
                        "tune": {"epochs": 1, "n_trials": 1, "pruner": "none",
                                 "storage": str(self.tmp / "study.journal"),
                                 "space": {"train.learning_rate": {"low": 0.001, "high": 0.05, "log": True}}}}
        if self.multiclass:
            nested["model"] = {"num_classes": 3}
            nested["data"]["rgb_map"] = synthetic.rgb_map(3)
        for key, value in flat.items():
            section, name = key.split(".")
            nested.setdefault(section, {})[name] = value
        for section, values in (extra or {}).items():
            if isinstance(values, dict):
                nested.setdefault(section, {}).update(values)
            else:
                nested[section] = values
        path.write_text(yaml.safe_dump(nested))
        return path

    def file(self, split: str, kind: str, index: int = 0) -> Path:
        return sorted((self.root / split / kind).iterdir())[index]


@dataclasses.dataclass
class Case:
    id: str
    what: str  # the bad input, as the report's table names it
    setup: Callable[[Workspace], list[str]]  # makes the bad input, returns the CLI arguments
    culprit: Callable[[Workspace], str] | str  # must appear in the Error line
    ok: bool = False  # accepted by design
    multiclass: bool = False
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    check: Callable[[Workspace], None] | None = None  # extra assertions (accepted cases)
    at_load: bool = False  # rejected when the config loads: no MLflow run, no output folder


def train(ws: Workspace, **extra) -> list[str]:
    return ["train", "--config", str(ws.config(extra or None))]


def _corrupt_png(ws):
    ws.file("train", "images", 1).write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 20)
    return train(ws)


def _truncated_jpeg(ws):
    png = ws.file("train", "images", 2)
    ok, buf = cv2.imencode(".jpg", cv2.imread(str(png)))
    png.unlink()
    png.with_suffix(".jpg").write_bytes(buf.tobytes()[: len(buf) // 2])  # cut mid-scan
    return train(ws)


def _zero_byte(ws):
    ws.file("valid", "masks", 1).write_bytes(b"")
    return train(ws)


def _image_without_mask(ws):
    ws.file("train", "masks", 3).unlink()
    return train(ws)


def _mask_without_image(ws):
    ws.file("test", "images", 0).unlink()
    return train(ws)


def _mask_other_size(ws):
    mask = ws.file("train", "masks", 0)
    cv2.imwrite(str(mask), cv2.resize(cv2.imread(str(mask)), (40, 36), interpolation=cv2.INTER_NEAREST))
    return train(ws)


def _rgba(ws):
    path = ws.file("train", "images", 0)
    bgr = cv2.imread(str(path))
    alpha = np.full(bgr.shape[:2], 77, np.uint8)  # a half-transparent alpha must not leak into RGB
    cv2.imwrite(str(path), np.dstack([bgr, alpha]))
    ws.expected = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return train(ws)


def _sixteen_bit(ws):
    path = ws.file("train", "images", 1)
    bgr = cv2.imread(str(path))
    cv2.imwrite(str(path), bgr.astype(np.uint16) * 257)  # 0..255 -> 0..65535, exact inverse of //257
    ws.expected = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return train(ws)


def _check_pixels(index: int):
    def check(ws: Workspace) -> None:
        path = ws.file("train", "images", index)
        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert raw.shape[2] == 4 or raw.dtype == np.uint16  # the file really is RGBA / 16-bit
        np.testing.assert_array_equal(data.read_rgb(path), ws.expected)
        assert (ws.out / "best_model.keras").is_file()
    return check


def _colour_not_in_map(ws):
    mask = ws.file("train", "masks", 2)
    bgr = cv2.imread(str(mask))
    bgr[:3, :3] = (255, 0, 255)  # magenta: far from black, red, green and blue
    cv2.imwrite(str(mask), bgr)
    return train(ws)


def _label_masks(ws):
    """Every mask stored as 0/1 labels (a common encoding) instead of 0/255."""
    for mask in ws.root.glob("*/masks/*.png"):
        cv2.imwrite(str(mask), (cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE) > 0).astype(np.uint8))


def _label_masks_thresholded(ws):
    # On the old main this trained on all-background masks and scored a perfect 1.0.
    _label_masks(ws)
    return train(ws, data={"binary_mask": "threshold"})


def _label_masks_auto(ws):
    _label_masks(ws)
    return train(ws)


def _check_label_masks(ws: Workspace) -> None:
    import json

    profile = json.loads((ws.out / "dataset_profile.json").read_text())
    assert profile["mask_encoding"] == "nonzero"
    assert set(profile["splits"]["train"]["mask_values"]) == {"0", "1"}
    assert all(profile["splits"][s]["class_pixels"][1] > 0 for s in ("train", "valid", "test"))
    [run] = runs_of(ws.experiment, os.environ["MLFLOW_TRACKING_URI"])
    assert run.data.tags["seg_mlops.mask_encoding"] == "nonzero"


def _no_valid_split(ws):
    shutil.rmtree(ws.root / "valid")
    return train(ws)


def _valid_fraction_and_folder(ws):
    return train(ws, data={"valid_fraction": 0.2})


def _bad_valid_group(ws):
    return train(ws, data={"valid_fraction": 0.2, "valid_group": "cell_(\\d+"})


def _empty_split(ws):
    for kind in ("images", "masks"):
        for path in (ws.root / "valid" / kind).iterdir():
            path.unlink()
    return train(ws)


def _thumbs_db(ws):
    (ws.root / "train" / "images" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 windows thumbnail cache")
    return train(ws)


def _missing_root(ws):
    return train(ws, data={"root": str(ws.tmp / "no-such-data")})


def _unknown_key(ws):
    return train(ws, model={"base_filter": 8})


def _wrong_type(ws):
    return train(ws, train={"epochs": "many"})


def _negative_epochs(ws):
    return train(ws, train={"epochs": -2})


def _not_divisible(ws):
    return train(ws, model={"image_height": 30})


def _dropout_all(ws):
    # 3 levels: the bridge would drop 0.5 * 2 = 1.0, i.e. everything (Keras accepts it silently)
    return train(ws, model={"dropout_rate": 0.5})


def _dropout_over_one(ws):
    # 5 levels: the bridge would get 0.3 * 4 = 1.2 (Keras raises deep inside the build)
    return ["train", "--config", str(ws.config()), "--set", "model.dropout_rate=0.3",
            "--set", "model.num_layers=5"]


def _bad_yaml(ws):
    return ["train", "--config", str(ws.config(raw="train:\n  epochs: [1, 2\n"))]


def _missing_config(ws):
    return ["train", "--config", str(ws.tmp / "nope.yaml")]


def _bad_override(ws):
    return ["train", "--config", str(ws.config()), "--set", "train.epochs"]


def _model_uri(ws):
    return ["evaluate", "--config", str(ws.config()), "--model", "models:/seg-no-such-model@champion"]


def _model_file(ws):
    return ["evaluate", "--config", str(ws.config()), "--model", str(ws.tmp / "gone" / "best_model.keras")]


def _corrupt_model_file(ws):
    (ws.tmp / "best_model.keras").write_bytes(b"PK\x03\x04 not a zip")
    return ["evaluate", "--config", str(ws.config()), "--model", str(ws.tmp / "best_model.keras")]


def _bad_storage(ws):
    return ["tune", "--config", str(ws.config()), "--storage",
            "postgresql://bob:hunter2@127.0.0.1:1/optuna"]


def _unknown_storage_scheme(ws):
    return ["tune", "--config", str(ws.config()), "--storage", "mongodb://127.0.0.1/optuna"]


def _incompatible_space(ws):
    # A study searched over learning_rate as a float range; the resumed config makes it a choice.
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(ws.tmp / "study.journal")))
    study = optuna.create_study(study_name=ws.experiment, storage=storage, direction="maximize")
    study.add_trial(optuna.trial.create_trial(
        params={"train.learning_rate": 0.01}, value=0.5,
        distributions={"train.learning_rate": optuna.distributions.FloatDistribution(0.001, 0.05, log=True)}))
    return ["tune", "--config", str(ws.config({"tune": {"space": {"train.learning_rate": [0.01, 0.02]}}}))]


def _other_direction(ws):
    # The stored study maximises val_dice_coef; the config now monitors val_loss (minimise).
    _incompatible_space(ws)
    return ["tune", "--config", str(ws.config({"train": {"monitor": "val_loss"}}))]


def _bad_tracking_server(ws):
    return train(ws)


CASES = [
    Case("corrupt_png", "corrupt PNG image", _corrupt_png, lambda ws: ws.file("train", "images", 1).name),
    Case("truncated_jpeg", "truncated JPEG image", _truncated_jpeg, "cell_0002.jpg"),
    Case("zero_byte", "zero-byte mask file", _zero_byte, lambda ws: ws.file("valid", "masks", 1).name),
    Case("image_without_mask", "image without mask", _image_without_mask, "cell_0003"),
    Case("mask_without_image", "mask without image", _mask_without_image, "cell_0000"),
    Case("mask_other_size", "mask of another size than its image", _mask_other_size, "40x36"),
    Case("rgba_image", "RGBA image (accepted: alpha dropped)", _rgba, "", ok=True, check=_check_pixels(0)),
    Case("16bit_image", "16-bit image (accepted: scaled to 8-bit)", _sixteen_bit, "", ok=True,
         check=_check_pixels(1)),
    Case("colour_not_in_rgb_map", "mask colour not in rgb_map", _colour_not_in_map, "(255, 0, 255)",
         multiclass=True),
    Case("label_masks_thresholded", "0/1 label masks with data.binary_mask: threshold", _label_masks_thresholded,
         "no foreground in the train split"),
    Case("label_masks_auto", "0/1 label masks (accepted: auto reads them as labels)", _label_masks_auto, "",
         ok=True, check=_check_label_masks),
    Case("no_valid_split", "no valid folder and no data.valid_fraction", _no_valid_split, "data.valid_fraction: 0.2"),
    Case("valid_fraction_and_folder", "data.valid_fraction with a valid folder", _valid_fraction_and_folder,
         "data.valid_fraction=0.2"),
    Case("bad_valid_group", "data.valid_group not a regular expression", _bad_valid_group, "data.valid_group="),
    Case("empty_split", "empty split (valid/ has no files)", _empty_split, "no images in"),
    Case("thumbs_db", "non-image file (Thumbs.db) in an image folder", _thumbs_db, "Thumbs.db"),
    Case("missing_data_root", "data.root does not exist", _missing_root, "no-such-data"),
    Case("unknown_key", "unknown config key", _unknown_key, "model.base_filter"),
    Case("wrong_type", "wrong type (train.epochs: many)", _wrong_type, "train.epochs='many'"),
    Case("negative_epochs", "negative epochs", _negative_epochs, "train.epochs=-2"),
    Case("not_divisible", "image size not divisible by 2^(layers-1)", _not_divisible, "model.image_height=30",
         at_load=True),
    Case("dropout_all", "dropout_rate x (num_layers-1) = 1 (bridge drops everything)", _dropout_all,
         "model.dropout_rate=0.5 with model.num_layers=3", at_load=True),
    Case("dropout_over_one", "dropout_rate x (num_layers-1) > 1 (--set)", _dropout_over_one,
         "model.dropout_rate=0.3 with model.num_layers=5", at_load=True),
    Case("bad_yaml", "config is not valid YAML", _bad_yaml, "case.yaml"),
    Case("missing_config", "config file missing", _missing_config, "nope.yaml"),
    Case("bad_override", "--set without =value", _bad_override, "train.epochs"),
    Case("missing_model_uri", "non-existent model URI", _model_uri, "models:/seg-no-such-model@champion"),
    Case("missing_model_file", "non-existent model file", _model_file, "best_model.keras"),
    Case("corrupt_model_file", "corrupt .keras model file", _corrupt_model_file, "best_model.keras: not a .keras file"),
    Case("bad_storage_url", "unreachable PostgreSQL storage URL (with a password)", _bad_storage,
         "postgresql://bob@127.0.0.1:1/optuna"),
    Case("unknown_storage_scheme", "storage URL of an unsupported database", _unknown_storage_scheme,
         "mongodb://127.0.0.1/optuna"),
    Case("incompatible_space", "resumed study, search space changed incompatibly", _incompatible_space,
         "train.learning_rate"),
    Case("other_direction", "resumed study, monitor of the other direction", _other_direction,
         "train.monitor=val_loss"),
    Case("bad_tracking_server", "MLFLOW_TRACKING_URI server unreachable", _bad_tracking_server,
         "http://127.0.0.1:9", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}),
]


def run_cli(args: list[str], env: dict[str, str], cwd: Path, debug: bool = False) -> subprocess.CompletedProcess:
    full = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env}
    full.pop("SEG_MLOPS_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "seg_mlops.cli", *(["--debug"] if debug else []), *args],
                          env=full, cwd=cwd, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)


def make_workspace(case: Case, datasets, tmp_path) -> Workspace:
    root = tmp_path / "data"
    shutil.copytree(datasets["multi" if case.multiclass else "binary"], root)
    return Workspace(tmp_path, root, f"bad-{case.id}", case.multiclass)


def runs_of(experiment: str, tracking_uri: str) -> list:
    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        return []
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, datasets, tmp_path, tracking_store):
    ws = make_workspace(case, datasets, tmp_path)
    args = case.setup(ws)
    proc = run_cli(args, case.env, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    shown = lines[-1] if lines else ""
    if case.ok and proc.returncode == 0:  # what train prints on success
        shown = next((line for line in proc.stdout.splitlines() if line.startswith("best ")), shown)
    SEEN[case.id] = f"exit {proc.returncode}: {shown}"
    assert "Traceback" not in output, output[-3000:]
    if case.ok:
        assert proc.returncode == 0, output[-3000:]
        case.check(ws)
        assert [r.info.status for r in runs_of(ws.experiment, tracking_store)] == ["FINISHED"]
        return
    assert proc.returncode == 1, output[-3000:]
    last = lines[-1]
    assert last.startswith("Error: "), output[-3000:]
    culprit = case.culprit(ws) if callable(case.culprit) else case.culprit
    assert culprit in last, last
    assert "hunter2" not in output  # a storage password is never echoed
    # Nothing half-written: no run left RUNNING (a run that started ends FAILED), no model, and no
    # output folder unless the run had started training.
    statuses = [r.info.status for r in runs_of(ws.experiment, tracking_store)]
    assert "RUNNING" not in statuses, statuses
    assert not (ws.out / "best_model.keras").exists()
    assert not ws.out.exists() or not any(ws.out.rglob("*.keras"))
    if case.at_load:
        assert statuses == [] and not ws.out.exists(), statuses


def test_debug_shows_the_traceback(datasets, tmp_path):
    ws = make_workspace(CASES[0], datasets, tmp_path)
    proc = run_cli(_unknown_key(ws), {}, cwd=tmp_path, debug=True)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("seg_mlops.errors.SegMlopsError: unknown config key")


def test_print_table():
    """The report's table, from what the cases above saw (run the module with -s to see it)."""
    if len(SEEN) < len(CASES):
        pytest.skip("the table needs every case of test_bad_input in the same session")
    width = max(len(c.what) for c in CASES)
    print("\n| bad input | what the user sees |\n|---|---|")
    for case in CASES:
        if case.id in SEEN:
            print(f"| {case.what:<{width}} | `{SEEN[case.id]}` |")
    assert len(CASES) >= 20


def test_unforeseen_errors_are_one_line_too():
    # A bug (any exception that is not a SegMlopsError) still gives one line and exit 1, and says
    # how to get the traceback; --debug lets it through unchanged.
    import click
    from click.testing import CliRunner

    from seg_mlops.cli import _Group

    @click.group(cls=_Group)
    @click.option("--debug", is_flag=True)
    def group(debug: bool) -> None:
        pass

    @group.command()
    def boom() -> None:
        raise ZeroDivisionError("division by zero\nsecond line")

    result = CliRunner().invoke(group, ["boom"])
    assert result.exit_code == 1
    assert result.output == ("Error: ZeroDivisionError: division by zero "
                             "(rerun with seg-mlops --debug for the traceback)\n")
    result = CliRunner().invoke(group, ["--debug", "boom"])
    assert isinstance(result.exception, ZeroDivisionError)
