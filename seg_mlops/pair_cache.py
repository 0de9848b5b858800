"""The decoded-pair cache of `data.cache`: where decoded, resized pairs are kept between epochs
(memory, a memory-mapped file, or nowhere) and what "auto" chooses.

Why not tf.data's own `cache()`: a cache freezes the order of what passes through it, so a
tf.data pipeline must shuffle *after* it, and `Dataset.shuffle(n)` then holds the n decoded pairs
in its buffer and fills the whole buffer before it yields the first element (tf.data's docs:
"fills a buffer with buffer_size elements, then randomly samples elements from this buffer").
In the first epoch, training waits until every image of the split is decoded; with a file cache,
every epoch starts by reading the whole file back into that buffer, so the "larger than memory"
cache held the whole split in memory anyway. A store with random access lets the pipeline
shuffle *indices* (n integers) before fetching, exactly as the streamed pipeline shuffles file
names before decoding: the first batch waits for batch_size decodes, later epochs read pairs by
index, and the order per seed is the same with or without a cache.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from seg_mlops.errors import SegMlopsError

GIB = 1024 ** 3
MEMORY_CAP = 2 * GIB  # data.cache "auto": at most this much memory ...
MEMORY_SHARE = 0.25  # ... and at most this share of the memory available now
Loader = Callable[[int], "tuple[np.ndarray, np.ndarray]"]


def decoded_bytes(n_images: int, height: int, width: int) -> int:
    """Bytes of n decoded pairs at the model size: uint8 RGB image + uint8 labels (4 per pixel)."""
    return n_images * height * width * 4


def resolve_cache(requested: str, n_images: int, height: int, width: int, budget_bytes: int,
                  disk_free_bytes: int) -> str:
    """The cache mode to use: `requested` unless it is "auto"; then "memory" when the decoded
    pairs fit `budget_bytes`, else "file" when they take at most half the free disk space of
    the output folder, else "off" (decode every epoch).

    Args:
        requested: data.cache ("auto", "off", "memory" or "file").
        n_images: pairs the training streams every epoch (train + valid).
        height, width: the model's input size (pairs are cached resized).
        budget_bytes: the memory the cache may take (`memory_budget`).
        disk_free_bytes: free bytes where a cache file would go.
    """
    if requested != "auto":
        return requested
    need = decoded_bytes(n_images, height, width)
    if need <= budget_bytes:
        return "memory"
    return "file" if need <= disk_free_bytes // 2 else "off"


def memory_budget(available_bytes: int) -> int:
    """What data.cache "auto" lets a memory cache take: min(2 GiB, 25 % of the available memory),
    which leaves the model, TensorFlow's buffers and other processes the rest."""
    return int(min(MEMORY_CAP, MEMORY_SHARE * available_bytes))


def available_memory() -> int:
    """Memory available to new allocations now, as psutil reports it (0 without psutil)."""
    try:
        import psutil
    except ImportError:  # a setup.cfg requirement, but never fatal: "auto" then takes no memory
        return 0
    return int(psutil.virtual_memory().available)


def disk_free(folder: Path) -> int:
    """Free bytes on the file system of `folder` (or of its nearest existing parent)."""
    import shutil

    folder = Path(folder).resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def decide(requested: str, n_images: int, height: int, width: int, output_dir: Path) -> tuple[str, str]:
    """data.cache resolved on this machine, and the line that says what was chosen and why."""
    if requested != "auto":
        return requested, f"cache: data.cache={requested}"
    budget, disk = memory_budget(available_memory()), disk_free(output_dir)
    mode = resolve_cache(requested, n_images, height, width, budget, disk)
    need = decoded_bytes(n_images, height, width)
    return mode, (f"cache: data.cache=auto -> {mode}: {n_images} decoded pairs at {height}x{width} take "
                  f"{_mib(need)}; memory budget {_mib(budget)} (min(2 GiB, 25 % of available)), "
                  f"free disk {_mib(disk)}")


def _mib(n: int) -> str:
    return f"{n / 1024 ** 2:.0f} MiB"


# ----------------------------------------------------------------------------- stores

class MemoryStore:
    """Pairs kept in a list, filled by whoever decodes them first (any pipeline thread)."""

    def __init__(self, n: int, load: Loader):
        self._pairs: list = [None] * n
        self._load = load

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        pair = self._pairs[index]
        if pair is None:
            pair = self._pairs[index] = self._load(index)  # a list store is atomic under the GIL
        return pair


class FileStore:
    """Pairs in one memory-mapped .npy file of shape (n, H, W, 4) uint8 (RGB + labels), written
    while the first pass decodes and made visible under its final name only once complete (a
    rename, atomic): a later run, or a process started at the same time, either reads a complete
    file or writes its own. The operating system's page cache keeps the file's hot pages in
    memory when there is room, and evicts them when not."""

    def __init__(self, path: Path, n: int, height: int, width: int, load: Loader):
        self.path = Path(path)
        self._load = load
        self._lock = threading.Lock()
        if self.path.exists():
            self._array = np.load(self.path, mmap_mode="r")
            self._filled = np.ones(n, bool)
        else:
            need, free = decoded_bytes(n, height, width), disk_free(self.path.parent)
            if need > free:  # a memory-mapped write past a full disk would kill the process (SIGBUS)
                raise SegMlopsError(f"data.cache=file needs {_mib(need)} in {self.path.parent} but only {_mib(free)} "
                                    "are free; free some space, or set data.cache: off (or memory)")
            self._partial = self.path.with_name(f"{self.path.stem}.{os.getpid()}.{id(self)}.partial.npy")
            self._array = np.lib.format.open_memmap(self._partial, mode="w+", dtype=np.uint8,
                                                    shape=(n, height, width, 4))
            self._filled = np.zeros(n, bool)

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._filled[index]:
            row = np.array(self._array[index])  # a copy: TensorFlow takes ownership of it
            return row[..., :3], row[..., 3]
        image, labels = self._load(index)
        self._array[index, ..., :3], self._array[index, ..., 3] = image, labels
        with self._lock:
            self._filled[index] = True
            if self._filled.all() and not self.path.exists():
                self._array.flush()
                os.replace(self._partial, self.path)
        return image, labels


def make_store(mode: str, path: Path | None, n: int, height: int, width: int, load: Loader):
    """The store of data.cache `mode` ("memory" or "file"); None for "off" (and an unresolved
    "auto": a pipeline built outside training, e.g. evaluation's one pass, has nothing to reuse)."""
    if mode == "memory":
        return MemoryStore(n, load)
    if mode == "file":
        return FileStore(path, n, height, width, load)
    return None
