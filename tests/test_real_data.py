"""Real data: a short training on the seed Pap-Smear experiment's own images must learn.

Runs whenever ../shared/data is there, and must run (not skip) when SEG_MLOPS_REAL_DATA is set.
"""

from __future__ import annotations

import keras

from seg_mlops import config, evaluate, train
from tests.conftest import real_data


def test_pap_smear_dice_rises_above_untrained(tmp_path):
    root = real_data("Herlev-PapSmear-SevereDysplastic")  # 91/18/20 pairs, 512 px
    cfg = config.load(None, [
        f"data.root={root}", f"train.output_dir={tmp_path / 'out'}", "experiment=pap-smear",
        "model.image_height=64", "model.image_width=64", "model.base_filters=8", "model.num_layers=4",
        "model.base_kernels=5", "model.dropout_rate=0.02", "train.batch_size=8", "train.epochs=15",
        "train.learning_rate=0.003", "train.patience=0", "train.epoch_infer_count=2"])

    keras.utils.set_random_seed(cfg.seed)
    from seg_mlops.model import build_unet
    import dataclasses
    untrained = evaluate.evaluate(build_unet(**dataclasses.asdict(cfg.model)), cfg, tmp_path / "untrained")

    result = train.train(cfg, verbose=0)
    trained = evaluate.evaluate(result.model, cfg, tmp_path / "trained")

    # Nuclei cover ~16 % of these images; an untrained net is near chance. After 15 short epochs
    # the test-split dice must be well above it, and the history must show learning.
    print(f"untrained dice {untrained['dice_foreground']:.3f} -> trained {trained['dice_foreground']:.3f}")
    assert trained["dice_foreground"] > untrained["dice_foreground"] + 0.2
    assert trained["dice_foreground"] > 0.5
    assert max(result.history["val_dice_coef"]) > result.history["val_dice_coef"][0]
