"""Read any config file the CLI accepts: the one place where a file's suffix picks its reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from seg_mlops import config, legacy

# Suffix (lower-case) -> reader; every other file is our YAML (config.load).
READERS = {
    ".config": legacy.load,  # the reference's train_eval_infer.config
    ".ini": legacy.load,
}


def load(path: str | Path | None = None, overrides: Iterable[str] | Mapping[str, Any] = ()) -> config.Config:
    """The Config of `path` (None: all defaults), read by its suffix's reader, overrides applied
    (see config.load)."""
    reader = READERS.get(Path(path).suffix.lower(), config.load) if path is not None else config.load
    return reader(path, overrides)
