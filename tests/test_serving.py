"""The registered model is the segmentation pipeline: a real `mlflow models serve` on 127.0.0.1
answers base64 PNG/JPEG of any size with the masks `seg-mlops infer` / `tiled-infer` write for the
same images (byte-equal PNG files), bad requests get a 400 with a one-line reason, and the pyfunc
loaded in Python takes arrays, flips (tta), probabilities and colour masks, with only its own code
and requirements."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.exceptions import MlflowException
from PIL import Image

from seg_mlops import config, infer, registry, serving, synthetic, tracking
from seg_mlops.cli import cli
from seg_mlops.data import read_rgb
from tests.conftest import SERVING_EXPERIMENT, TINY
from tests.test_mlflow import MLFLOW, free_port, serve, venv_env

CHAMPION = f"models:/{registry.registered_name(SERVING_EXPERIMENT)}@champion"


@pytest.fixture
def trained(serving_run):
    return serving_run


def cli_masks(trained, command: str, *extra: str) -> dict[str, bytes]:
    """Mask files `seg-mlops <command>` writes for the image folder, by image stem."""
    out = trained["tmp"] / f"{command}{''.join(extra)}"
    result = CliRunner().invoke(cli, [command, "--config", str(trained["yaml"]), "--model", CHAMPION,
                                      "--images", str(trained["images"]), "--output", str(out), *extra])
    assert result.exit_code == 0, result.output
    return {p.stem: p.read_bytes() for p in sorted(out.glob("*.png"))}


def post(port: int, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def records(files: list[Path]) -> list[dict]:
    return [{"image": base64.b64encode(f.read_bytes()).decode("ascii")} for f in files]


def labels_of(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_rest_serving_answers_like_the_cli(trained):
    files = sorted(trained["images"].iterdir())
    expected = {"resize": cli_masks(trained, "infer"), "tiled": cli_masks(trained, "tiled-infer")}
    port = free_port()
    args = [MLFLOW, "models", "serve", "-m", CHAMPION, "--env-manager", "local", "-h", "127.0.0.1",
            "-p", str(port)]
    with serve(args, f"http://127.0.0.1:{port}/ping", venv_env(MLFLOW_TRACKING_URI=tracking.tracking_uri())):
        for mode in ("resize", "tiled"):
            status, body = post(port, {"dataframe_records": records(files), "params": {"mode": mode}})
            assert status == 200, body
            rows = body["predictions"]
            for file, row in zip(files, rows):
                mask = base64.b64decode(row["mask"])
                assert mask == expected[mode][file.stem], (mode, file.name)  # the same PNG file, byte for byte
                labels = labels_of(mask) // 255
                assert (row["height"], row["width"]) == labels.shape == read_rgb(file).shape[:2]
                assert row["pixels"] == np.bincount(labels.ravel(), minlength=2).tolist()
                assert row["error"] == ""
        # Bad requests: 400 with a one-line reason, and the server answers the next request.
        status, body = post(port, {"dataframe_records": [{"image": base64.b64encode(b"not an image").decode()}]})
        assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE"
        assert body["message"].splitlines()[-1] == \
            "Error: cannot decode image 0: empty, truncated or not an image"
        status, body = post(port, {"dataframe_records": records(files[:1]), "params": {"mode": "sideways"}})
        assert status == 400
        assert body["message"].splitlines()[-1] == "Error: param mode='sideways': expected one of resize, tiled"
        status, body = post(port, {"dataframe_records": records(files[:1]), "params": {"threshold": "high"}})
        assert status == 400 and "threshold" in body["message"]
        status, body = post(port, {"dataframe_records": records(files[:1])})
        assert status == 200 and base64.b64decode(body["predictions"][0]["mask"]) == expected["resize"][files[0].stem]


def test_pipeline_in_python(trained):
    """Arrays or bytes in; tta, probabilities and colour masks; a bad row reported, not raised."""
    files = sorted(trained["images"].iterdir())
    model = mlflow.pyfunc.load_model(CHAMPION)
    arrays = [read_rgb(f) for f in files]
    as_bytes = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    as_arrays = model.predict(pd.DataFrame({"image": arrays}))
    assert as_bytes["mask"].tolist() == as_arrays["mask"].tolist()

    tta = model.predict(pd.DataFrame({"image": arrays}), params={"tta": True})
    expected = cli_masks(trained, "infer", "--tta")
    assert tta["mask"].tolist() == [expected[f.stem] for f in files]

    probs = model.predict(pd.DataFrame({"image": arrays}), params={"output": "probabilities"})
    colour = model.predict(pd.DataFrame({"image": arrays}), params={"output": "colorized"})
    palette = np.asarray(trained["cfg"].palette(), np.uint8)
    for image, mask, p, c in zip(arrays, as_bytes["mask"], probs["mask"], colour["mask"]):
        labels = labels_of(mask) // 255
        prob = np.load(io.BytesIO(p))
        assert prob.shape == image.shape[:2] + (1,) and prob.dtype == np.float32
        np.testing.assert_array_equal((prob[..., 0] >= trained["cfg"].infer.threshold).astype(np.uint8), labels)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(c)).convert("RGB")), palette[labels])

    mixed = model.predict(pd.DataFrame({"image": [b"junk", files[0].read_bytes()]}), params={"on_error": "report"})
    assert mixed["error"].tolist() == ["cannot decode image 0: empty, truncated or not an image", ""]
    alone = model.predict(pd.DataFrame({"image": [files[0].read_bytes()]}))["mask"][0]
    assert mixed["mask"].tolist() == [b"", alone] and labels_of(alone).tolist() == labels_of(as_bytes["mask"][0]).tolist()
    with pytest.raises(MlflowException, match=r"param overlap=12: must be below half the tile \(24 px\), i.e. at most 11"):
        model.predict(pd.DataFrame({"image": arrays[:1]}), params={"mode": "tiled", "overlap": 12})
    with pytest.raises(MlflowException, match="image 0: expected an HxWx3 uint8 RGB array"):
        model.predict(pd.DataFrame({"image": [np.zeros((4, 4), np.uint8)]}))


def test_pipeline_needs_only_its_own_code_and_requirements(trained):
    """A fresh process loads the registered pipeline with Optuna made unimportable: seg_mlops comes
    from the model's own copy (code_paths), no training module is imported."""
    requirements = Path(mlflow.artifacts.download_artifacts(f"{CHAMPION}/requirements.txt")).read_text()
    assert "keras==" in requirements and "opencv-python-headless==" in requirements
    assert "optuna" not in requirements
    script = (
        "import sys; sys.modules['optuna'] = None; sys.modules['optuna_integration'] = None\n"
        "import mlflow, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model({CHAMPION!r})\n"
        f"out = m.predict(pd.DataFrame({{'image': [open({str(sorted(trained['images'].iterdir())[0])!r}, 'rb').read()]}}))\n"
        "import seg_mlops\n"
        "print(seg_mlops.__file__)\n"
        "print(sorted(n for n in sys.modules if n.startswith('seg_mlops.')))\n"
        "print(out['mask'][0][:4])\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=venv_env(MLFLOW_TRACKING_URI=tracking.tracking_uri()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    location, modules, head = proc.stdout.strip().splitlines()[-3:]
    assert Path(location).parent.parent.name == "code"  # <model>/code/seg_mlops/__init__.py
    assert not {"seg_mlops.train", "seg_mlops.tuning", "seg_mlops.tracking"} & set(eval(modules))
    assert head == repr(b"\x89PNG")


def test_multiclass_pipeline_writes_palette_pngs_like_infer(multiclass_root, tmp_path):
    """A 3-class network (untrained: its argmax still varies) logged as a pipeline gives the palette
    PNG files `infer_folder` writes."""
    from seg_mlops.model import build_unet

    cfg = config.load(None, [f"data.root={multiclass_root}", "model.num_classes=3",
                             f"data.rgb_map={synthetic.rgb_map(3)}", *TINY, "experiment=serving-multi"])
    network = build_unet(image_height=32, image_width=32, num_classes=3, base_filters=4, num_layers=3)
    images = multiclass_root / "test" / "images"
    expected_paths = infer.infer_folder(network, images, tmp_path / "out", palette=cfg.palette())
    with tracking.start_run(cfg):
        uri = serving.log_pipeline(tracking.serving_copy(network), cfg)
    model = mlflow.pyfunc.load_model(uri)
    files = sorted(images.iterdir())
    out = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    assert out["mask"].tolist() == [p.read_bytes() for p in sorted(expected_paths)]
    labels = [np.asarray(Image.open(p)) for p in sorted(expected_paths)]
    assert out["pixels"].map(list).tolist() == [np.bincount(lab.ravel(), minlength=3).tolist() for lab in labels]
    assert len({int(v) for lab in labels for v in np.unique(lab)}) > 1  # not a constant answer


def test_registered_version_has_a_model_card_and_a_dockerfile(trained, tmp_path):
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(registry.registered_name(SERVING_EXPERIMENT), "champion")
    run = client.get_run(trained["run_id"])
    card = version.description
    assert f"dataset fingerprint: `{run.data.tags['seg_mlops.dataset_fingerprint']}`" in card
    assert "classes (2): 0 background (0, 0, 0), 1 foreground (mask value 255)" in card
    assert f"| test_dice_coef | {run.data.metrics['test_dice_coef']:.4f} |" in card
    assert f"| best_val_dice_coef (ranks versions) | {run.data.metrics['best_val_dice_coef']:.4f} |" in card
    assert f"mlflow models serve -m models:/seg-serving/{version.version} --env-manager local" in card
    # MLflow's own Dockerfile generator takes the pipeline as it is (building it needs Docker).
    out = tmp_path / "docker"
    proc = subprocess.run([MLFLOW, "models", "generate-dockerfile", "-m", CHAMPION, "-d", str(out)],
                          env=venv_env(MLFLOW_TRACKING_URI=tracking.tracking_uri()), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ENTRYPOINT" in (out / "Dockerfile").read_text()
    assert (out / "model_dir" / "code" / "seg_mlops" / "serving.py").is_file()
    assert "keras==" in (out / "model_dir" / "requirements.txt").read_text()
