"""Tests for seg_mlops.pair_cache: what data.cache "auto" chooses on given inputs (not how fast it
is: bench/ measures that), and the memory and file stores the cached pipeline reads by index."""

from __future__ import annotations

import numpy as np
import pytest

from seg_mlops import pair_cache

GIB = 1024 ** 3


@pytest.mark.parametrize("requested, n, size, budget, disk, chosen", [
    # Herlev train + valid at 128 px: 109 x 128 x 128 x 4 = 7,143,424 bytes
    ("auto", 109, 128, 2 * GIB, 100 * GIB, "memory"),
    # 1000 pairs at 512 px: 1,048,576,000 bytes, under 2 GiB
    ("auto", 1000, 512, 2 * GIB, 100 * GIB, "memory"),
    # exactly the budget still fits: 512 x 1024 x 1024 x 4 = 2 GiB; one pair more does not
    ("auto", 512, 1024, 2 * GIB, 100 * GIB, "memory"),
    ("auto", 513, 1024, 2 * GIB, 100 * GIB, "file"),
    # 3000 at 512 px = 3,145,728,000 bytes: a file when it takes at most half the free disk ...
    ("auto", 3000, 512, 2 * GIB, 6_291_456_000, "file"),
    # ... and streaming when it would take more
    ("auto", 3000, 512, 2 * GIB, 6_291_455_999, "off"),
    ("auto", 109, 128, 0, 100 * GIB, "file"),  # no memory to spare (or no psutil): budget 0
    # explicit values are kept, whatever the numbers
    ("off", 109, 128, 2 * GIB, 100 * GIB, "off"),
    ("memory", 3000, 512, 2 * GIB, 0, "memory"),
    ("file", 109, 128, 2 * GIB, 0, "file"),
])
def test_resolve_cache_on_given_inputs(requested, n, size, budget, disk, chosen):
    assert pair_cache.resolve_cache(requested, n, size, size, budget, disk) == chosen


def test_memory_budget_is_2_gib_or_a_quarter_of_what_is_available():
    assert pair_cache.memory_budget(16 * GIB) == 2 * GIB  # a quarter would be 4 GiB
    assert pair_cache.memory_budget(4 * GIB) == GIB
    assert pair_cache.memory_budget(1000) == 250
    assert pair_cache.memory_budget(0) == 0


def test_decide_says_what_it_chose_with_the_numbers(tmp_path):
    assert pair_cache.decide("file", 12, 32, 32, tmp_path) == ("file", "cache: data.cache=file")
    mode, line = pair_cache.decide("auto", 12, 32, 32, tmp_path / "not" / "yet")  # 48 KiB
    assert mode == "memory"
    assert line.startswith("cache: data.cache=auto -> memory: 12 decoded pairs at 32x32 take 0 MiB; "
                           "memory budget ")
    assert "(min(2 GiB, 25 % of available)), free disk " in line


def _loader(calls: list[int]):
    """A pair loader that records which indices it decoded: pair i is filled with i."""
    def load(i: int):
        calls.append(i)
        return np.full((4, 5, 3), i, np.uint8), np.full((4, 5), 10 + i, np.uint8)
    return load


def test_memory_store_decodes_each_pair_once():
    calls: list[int] = []
    store = pair_cache.MemoryStore(3, _loader(calls))
    for i in (2, 0, 2, 1, 0, 2):
        image, labels = store.get(i)
        assert image.shape == (4, 5, 3) and (image == i).all() and (labels == 10 + i).all()
    assert calls == [2, 0, 1]
    assert pair_cache.make_store("off", None, 3, 4, 5, _loader(calls)) is None
    assert pair_cache.make_store("auto", None, 3, 4, 5, _loader(calls)) is None  # unresolved: stream


def test_file_store_appears_complete_or_not_at_all(tmp_path):
    path = tmp_path / "cache.npy"
    calls: list[int] = []
    store = pair_cache.FileStore(path, 3, 4, 5, _loader(calls))
    store.get(1), store.get(0)
    assert not path.exists() and len(list(tmp_path.glob("*.partial.npy"))) == 1  # incomplete: invisible
    store.get(2)
    assert path.exists() and not list(tmp_path.glob("*.partial.npy"))  # renamed once complete
    assert np.load(path).shape == (3, 4, 5, 4)
    for i in (2, 1, 0):  # read back by index, no decoding
        image, labels = store.get(i)
        assert (image == i).all() and (labels == 10 + i).all()
    assert calls == [1, 0, 2]

    def refuse(i: int):
        raise AssertionError("a complete cache file must not decode")

    again = pair_cache.FileStore(path, 3, 4, 5, refuse)  # the next run
    image, labels = again.get(1)
    assert image.shape == (4, 5, 3) and (image == 1).all() and (labels == 11).all()


def test_file_store_refuses_a_cache_larger_than_the_free_disk(tmp_path):
    from seg_mlops.errors import SegMlopsError

    with pytest.raises(SegMlopsError, match=r"data.cache=file needs 4000000000 MiB in .* free; free some space, "
                                            r"or set data.cache: off"):
        pair_cache.FileStore(tmp_path / "c.npy", 1_000_000_000, 1024, 1024, _loader([]))
    assert not list(tmp_path.iterdir())  # nothing written
