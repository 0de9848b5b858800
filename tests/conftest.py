"""Shared fixtures: tiny synthetic datasets, tiny-model configs, and the real-data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from seg_mlops import config, synthetic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# A model small enough for a CPU unit test: 32 px, 3 levels, 4 filters.
TINY = ["model.image_height=32", "model.image_width=32", "model.base_filters=4", "model.num_layers=3",
        "model.dropout_rate=0.0", "train.batch_size=4", "train.learning_rate=0.01", "train.epochs=2",
        "train.epoch_infer_count=2"]
SERVING_EXPERIMENT = "serving"  # the serving_run fixture's experiment (registered as seg-serving)


@pytest.fixture(scope="session", autouse=True)
def tracking_store(tmp_path_factory) -> str:
    """A throwaway MLflow store for the whole session (never the project's tracking/)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(autouse=True)
def _session_store_per_test(tracking_store):
    """Every test starts on the session store: `mlflow.set_tracking_uri` also sets
    $MLFLOW_TRACKING_URI, so a test that points MLflow at a server it then stops would otherwise
    leave every later test talking to a dead server."""
    import mlflow

    os.environ["MLFLOW_TRACKING_URI"] = tracking_store
    mlflow.set_tracking_uri(tracking_store)


@pytest.fixture(scope="session")
def binary_root(tmp_path_factory) -> Path:
    return synthetic.make_dataset(tmp_path_factory.mktemp("binary"), classes=1, size=48, counts=(8, 4, 4))


@pytest.fixture(scope="session")
def multiclass_root(tmp_path_factory) -> Path:
    return synthetic.make_dataset(tmp_path_factory.mktemp("multi"), classes=3, size=48, counts=(8, 4, 4))


@pytest.fixture(scope="session")
def serving_run(binary_root, tmp_path_factory, tracking_store):
    """One tiny training run (32 px model), registered as champion, and a folder of images of other
    sizes: the synthetic test images (48 px), one stretched to 70x53 and one as JPEG."""
    import cv2
    import mlflow

    from seg_mlops import registry, tracking

    tmp = tmp_path_factory.mktemp("serving")
    mlflow.set_tracking_uri(tracking_store)
    cfg = config.load(None, [f"data.root={binary_root}", f"train.output_dir={tmp / 'out'}", *TINY,
                             "train.epochs=1", f"experiment={SERVING_EXPERIMENT}", "tiled_infer.overlap=4",
                             "tiled_infer.tile_size=24"])
    _, run_id = tracking.train(cfg)
    result = registry.register_best(cfg)
    assert result.promoted and result.run_id == run_id
    images = tmp / "images"
    images.mkdir()
    sources = sorted((binary_root / "test" / "images").glob("*.png"))
    for src in sources[:2]:
        (images / src.name).write_bytes(src.read_bytes())
    stretched = cv2.resize(cv2.imread(str(sources[2])), (70, 53), interpolation=cv2.INTER_LINEAR)
    cv2.imwrite(str(images / "stretched.png"), stretched)
    cv2.imwrite(str(images / "photo.jpg"), cv2.imread(str(sources[3])), [cv2.IMWRITE_JPEG_QUALITY, 90])
    yaml_path = tmp / "cfg.yaml"
    yaml_path.write_text(config.to_yaml(cfg))
    return {"cfg": cfg, "yaml": yaml_path, "run_id": run_id, "images": images, "tmp": tmp}


@pytest.fixture
def tiny_cfg(binary_root, tmp_path):
    """A tiny binary config writing into this test's tmp folder; extra `--set` strings apply."""
    def make(*overrides: str) -> config.Config:
        return config.load(None, [f"data.root={binary_root}", f"train.output_dir={tmp_path / 'out'}",
                                  *TINY, *overrides])
    return make


@pytest.fixture
def tiny_multiclass_cfg(multiclass_root, tmp_path):
    def make(*overrides: str) -> config.Config:
        return config.load(None, [f"data.root={multiclass_root}", f"train.output_dir={tmp_path / 'out'}",
                                  "model.num_classes=3", f"data.rgb_map={synthetic.rgb_map(3)}",
                                  *TINY, *overrides])
    return make


def numpy_scores(model, cfg: config.Config, split: str) -> dict[str, float]:
    """Scores of `model` on a split computed in NumPy from the decoded pairs, independently of
    Keras' metrics and of seg_mlops.evaluate: `dice_coef` (the reference's batch-global soft dice,
    smoothed by 1, averaged over the batches of train.batch_size in file order) and the hard dice
    over the whole split of each class (`dice_foreground` for binary, `dice_class<i>` multiclass)."""
    import numpy as np

    from seg_mlops import data

    loaded = [data.load_pair(pair, cfg) for pair in data.split_pairs(cfg, split)]
    images = np.stack([image for image, _ in loaded]).astype("float32")
    labels = np.stack([label for _, label in loaded]).astype(int)
    probs = np.asarray(model.predict(images, batch_size=cfg.train.batch_size, verbose=0), np.float64)
    classes = cfg.model.num_classes
    truth = (labels[..., None] == 1) if classes == 1 else (labels[..., None] == np.arange(classes))
    size = cfg.train.batch_size
    batches = [(truth[i:i + size], probs[i:i + size]) for i in range(0, len(images), size)]
    scores = {"dice_coef": float(np.mean([(2 * (t * p).sum() + 1) / (t.sum() + p.sum() + 1) for t, p in batches]))}
    hard = (probs >= cfg.infer.threshold) if classes == 1 else (probs.argmax(-1)[..., None] == np.arange(classes))
    names = ["foreground"] if classes == 1 else [f"class{i}" for i in range(classes)]
    for c, name in enumerate(names):
        t, h = truth[..., c], hard[..., c]
        if t.any():
            scores[f"dice_{name}"] = float(2 * (t & h).sum() / (t.sum() + h.sum()))
    return scores


def real_data(name: str) -> Path:
    """A dataset of ../shared/data (or $SEG_MLOPS_REAL_DATA). When SEG_MLOPS_REAL_DATA is set the
    data must be there (CI): a missing folder fails the test instead of skipping it."""
    env = os.environ.get("SEG_MLOPS_REAL_DATA")
    root = Path(env) if env else REPO.parent / "shared" / "data"
    path = root / name
    if not path.is_dir():
        if env:
            pytest.fail(f"SEG_MLOPS_REAL_DATA={env} has no {name}")
        pytest.skip(f"real data {path} not available (set SEG_MLOPS_REAL_DATA)")
    return path


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory) -> str:
    """A throwaway PostgreSQL server on 127.0.0.1 for the whole session (tracking/postgres.sh; on a
    fresh Debian machine it first installs the postgresql package, hence the long timeout). If the
    script fails, the tests using this fixture fail with its stderr: they never skip."""
    import subprocess

    script = REPO / "tracking" / "postgres.sh"
    pgdir = tmp_path_factory.mktemp("postgres")

    def run(*args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(script), *args, str(pgdir)], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)

    try:
        proc = run("start", timeout=300)
    except subprocess.TimeoutExpired as exc:
        run("remove", timeout=60)
        pytest.fail(f"tracking/postgres.sh start timed out after 300 s:\n{exc.stderr or ''}", pytrace=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or "://" not in lines[-1]:
        run("remove", timeout=60)
        pytest.fail(f"tracking/postgres.sh start failed (exit {proc.returncode}):\n{proc.stderr}"
                    f"\nstdout: {proc.stdout}", pytrace=False)
    yield lines[-1]
    run("remove", timeout=60)
