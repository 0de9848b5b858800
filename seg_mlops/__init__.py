"""seg_mlops: Keras UNet segmentation wired into MLflow and Optuna."""

__version__ = "0.1.0"
