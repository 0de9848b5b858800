"""`seg-mlops batch-infer` with the registered pipeline, in one process and on a real local Spark
(local[2], MLflow's own spark_udf): the masks equal `seg-mlops infer`'s files byte for byte, a
corrupt image lands in failed.csv with its reason, and a relaunch skips the masks already there."""

from __future__ import annotations

import csv
import os
import shutil

import pytest
from click.testing import CliRunner

from seg_mlops.cli import cli
from tests.test_serving import CHAMPION, cli_masks


@pytest.fixture
def batch_input(serving_run, tmp_path):
    """Two sub-folders of the serving images (PNG and JPEG, several sizes) and one corrupt PNG."""
    root = tmp_path / "slides"
    files = sorted(serving_run["images"].iterdir())
    for sub, chunk in (("a", files[:2]), ("b/c", files[2:])):
        (root / sub).mkdir(parents=True)
        for f in chunk:
            shutil.copy(f, root / sub / f.name)
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but truncated")
    return root, {f"{'a' if i < 2 else 'b/c'}/{f.stem}": f.stem for i, f in enumerate(files)}


def batch_infer(*args: str) -> str:
    result = CliRunner().invoke(cli, ["batch-infer", "--model", CHAMPION, *args])
    assert result.exit_code == 0, result.output
    return result.output


def failed(output) -> list[list[str]]:
    with open(output / "failed.csv", newline="") as f:
        return list(csv.reader(f))


@pytest.mark.parametrize("engine", ["local", "spark"])
def test_batch_infer_writes_the_masks_of_infer(serving_run, batch_input, tmp_path, engine):
    root, names = batch_input
    expected = cli_masks(serving_run, "infer")
    out = tmp_path / "masks"
    engine_args = ["--engine", engine] + (["--master", "local[2]"] if engine == "spark" else [])
    text = batch_infer("--images", f"{root}/**/*.*", "--output", str(out), *engine_args)
    assert "wrote 4 masks" in text and "0 already there; 1 failed" in text
    written = {str(p.relative_to(out).with_suffix("")): p.read_bytes() for p in out.rglob("*.png")}
    assert written == {rel: expected[stem] for rel, stem in names.items()}  # same files, byte for byte
    assert failed(out) == [["path", "reason"],
                           [str(root / "b" / "broken.png"), "empty, truncated or not an image"]]
    # A relaunch scores only what has no mask yet (the broken image is tried again).
    os.remove(out / f"{next(iter(names))}.png")
    text = batch_infer("--images", f"{root}/**/*.*", "--output", str(out), *engine_args)
    assert "wrote 1 masks" in text and "3 already there; 1 failed" in text
    assert {str(p.relative_to(out).with_suffix("")): p.read_bytes() for p in out.rglob("*.png")} == written


@pytest.mark.parametrize("args, line", [
    (["--model", CHAMPION, "--images", "{tmp}/nowhere/*.png"], "Error: --images {tmp}/nowhere/*.png: no images there"),
    (["--model", "models:/seg-no-such-model@champion", "--images", "{images}"],
     "Error: cannot load model models:/seg-no-such-model@champion:"),
])
def test_batch_infer_bad_input_is_one_line(serving_run, tmp_path, args, line):
    args = [a.format(tmp=tmp_path, images=serving_run["images"]) for a in args]
    result = CliRunner().invoke(cli, ["batch-infer", *args, "--output", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and result.output.startswith(line.format(tmp=tmp_path)), result.output
