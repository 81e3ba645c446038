"""Snapshot modes, per-save staging state and deadlock freedom, driven through the host engine,
which shares the pack planning, buffer pools and arenas with the CUDA engine (no CUDA needed)."""
import concurrent.futures
import gc
import os
import threading
import weakref

import numpy as np
import pytest

import gpusaver
from gpusaver import core
from gpusaver.staging import devices
from gpusaver.staging.io_types import SaveItem
from gpusaver.staging.pool import Arena, BufferPool
from gpusaver.staging.session import plan_groups
from gpusaver.staging.stager import Stager

MiB = 1 << 20
TIMEOUT = 60  # seconds: a save that takes longer here has deadlocked


def _item(name, n, dtype=np.float32, device="cpu"):
    a = np.zeros(n, dtype)
    return SaveItem(name, a, devices.parse(device), a.dtype, a.shape)


def _save(prefix, arrays, options, **kw):
    """save_async(...).result() with a deadline, so a deadlock fails the test instead of hanging."""
    done = []
    t = threading.Thread(target=lambda: done.append(gpusaver.save_async(prefix, arrays, options, **kw).result()),
                         daemon=True)
    t.start()
    t.join(TIMEOUT)
    assert done, f"the save did not finish in {TIMEOUT} s (deadlock)"
    return done[0]


def _check(prefix, arrays):
    got = gpusaver.load(prefix)
    assert set(got) == set(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


# -- pack planning ------------------------------------------------------------------------------
def test_groups_are_runs_of_consecutive_small_tensors():
    items = [_item("a", 10), _item("big", 1000), _item("b", 10), _item("c", 20), _item("s", 5, object),
             _item("d", 3), _item("e", 3, device="cuda:0"), _item("f", 3, device="cuda:0"), _item("z", 0)]
    groups = plan_groups(items, threshold=400, limit=10_000)
    # 'a' and 'b' are not grouped across 'big' (the group would hold its buffer while 'big'
    # waits for buffers); strings and empty tensors break runs; devices never mix.
    assert [[i.name for i in g.items] for g in groups] == [["b", "c"], ["e", "f"]]
    assert groups[0].offsets == [0, 48] and groups[0].nbytes == 128


def test_groups_fit_their_buffer_even_when_the_threshold_is_larger():
    items = [_item(f"t{i}", 100) for i in range(50)]  # 400 bytes each
    groups = plan_groups(items, threshold=1 << 30, limit=1000)
    assert all(g.nbytes <= 1000 for g in groups)
    assert sum(len(g.items) for g in groups) == 50
    assert plan_groups([_item("x", 1000)], threshold=1 << 30, limit=1000) == []  # larger than a buffer


# -- deadlock freedom ---------------------------------------------------------------------------
def _mixed(seed=0):
    rng = np.random.default_rng(seed)
    return {"s1": rng.random(100, dtype=np.float32), "big": rng.random(5 * MiB // 4, dtype=np.float32),
            "s2": rng.random(50, dtype=np.float32), "s3": rng.random(70, dtype=np.float32),
            "mid": rng.random(300_000, dtype=np.float32), "str": np.array([b"x", b"yz"], dtype=object),
            "s4": rng.random(9, dtype=np.float32)}


@pytest.mark.parametrize("mode", ["copy", "host", "reference"])
@pytest.mark.parametrize("budget,chunk,threshold,shards", [
    (MiB, MiB, 64 * 1024, 1),            # one buffer, small/large/small
    (MiB, MiB, 64 * MiB, 1),             # pack threshold larger than the buffer
    (MiB, MiB, 64 * 1024, 3),            # one buffer shared by three shard producers
    (3 * MiB, MiB, MiB, 2),
    (1000, 333, 500, 2),                 # odd sizes: groups and chunks not aligned
])
def test_no_budget_chunk_threshold_shard_combination_deadlocks(tmp_path, mode, budget, chunk, threshold, shards):
    arrays = _mixed()
    opts = gpusaver.Options(buffer_budget=budget, chunk_size=chunk, pack_threshold=threshold,
                            num_shards=shards, snapshot=mode)
    _save(str(tmp_path / "c"), arrays, opts)
    _check(str(tmp_path / "c"), arrays)


@pytest.mark.parametrize("mode", ["copy", "host"])
def test_many_pack_groups_through_two_buffers(tmp_path, mode):
    # Small tensors reach the writer in batches; a batch holding pack buffers must be sent before
    # the next group waits for a buffer, or the producer waits on buffers only that batch frees.
    arrays = {f"t{i}": np.full(100, i, np.float32) for i in range(3000)}
    opts = gpusaver.Options(buffer_budget=128 * 1024, chunk_size=64 * 1024, snapshot=mode)
    _save(str(tmp_path / "g"), arrays, opts)
    _check(str(tmp_path / "g"), arrays)


def test_concurrent_saves_share_one_buffer_without_deadlock_or_mixing(tmp_path):
    opts = gpusaver.Options(buffer_budget=2 * MiB, chunk_size=MiB, snapshot="copy")
    stager = Stager(opts)

    def run(k):
        arrays = {f"t{i}": np.full(1000 + i, float(k), np.float32) for i in range(200)}
        arrays["big"] = np.full(3 * MiB // 4, float(k), np.float32)
        gpusaver.save_async(str(tmp_path / f"c{k}"), arrays, opts, stager=stager).result(TIMEOUT)
        return arrays

    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        results = list(ex.map(run, range(6), timeout=TIMEOUT))
    for k, arrays in enumerate(results):  # same names in every save: each file holds its own bytes
        _check(str(tmp_path / f"c{k}"), arrays)


def test_failed_saves_give_back_every_buffer(tmp_path):
    opts = gpusaver.Options(buffer_budget=2 * MiB, chunk_size=MiB, snapshot="copy")
    stager = Stager(opts)
    arrays = _mixed()
    os.makedirs(tmp_path / "f.index")  # the index cannot be renamed into place: fails after staging
    for _ in range(stager.host_pool.capacity + 2):  # more failures than buffers: a leak would hang
        with pytest.raises(OSError):
            gpusaver.save_async(str(tmp_path / "f"), arrays, opts, stager=stager).result(TIMEOUT)
    assert len(stager.host_pool._free) == stager.host_pool._allocated
    os.rmdir(tmp_path / "f.index")
    gpusaver.save_async(str(tmp_path / "f"), arrays, opts, stager=stager).result(TIMEOUT)
    _check(str(tmp_path / "f"), arrays)


def test_nonblocking_take_never_waits():
    pool = BufferPool(2 * MiB, MiB)
    a, b = pool.take(MiB), pool.take(MiB)
    assert pool.take(MiB, wait=False) is None
    pool.give(a)
    assert pool.take(MiB, wait=False) is a
    pool.give(b)


# -- snapshot modes -------------------------------------------------------------------------------
def test_modes_resolve_by_source():
    assert gpusaver.Options().snapshot == "auto"
    assert gpusaver.Options().snapshot_mode(copy_on_write=True) == "reference"
    assert gpusaver.Options().snapshot_mode(copy_on_write=False) == "host"
    assert gpusaver.Options(snapshot="copy").snapshot_mode(copy_on_write=True) == "copy"
    with pytest.raises(ValueError, match="'auto', 'reference', 'host', 'copy'"):
        gpusaver.Options(snapshot="pinned")


@pytest.mark.parametrize("mode", ["auto", "host", "copy"])
def test_in_place_mutation_after_save_async_is_not_saved(tmp_path, mode):
    x = np.ones(3 * MiB, np.float32)
    small = np.ones(100, np.float32)
    future = gpusaver.save_async(str(tmp_path / "m"), {"x": x, "small": small, "other": small * 3},
                                 gpusaver.Options(snapshot=mode, chunk_size=MiB))
    x[:] = 2  # in place, as an optimizer step would
    small[:] = 2
    future.result(TIMEOUT)
    got = gpusaver.load(str(tmp_path / "m"))
    assert (got["x"] == 1).all() and (got["small"] == 1).all() and (got["other"] == 3).all()


@pytest.mark.parametrize("mode", ["host", "copy"])
def test_staged_arrays_are_released_before_the_write_finishes(tmp_path, mode):
    """Copy and host modes drop each array once its bytes are staged (a 1 GiB model assigned
    during a slow save once grew host memory by a model's worth in copy mode)."""
    gate = threading.Event()
    x = np.ones(4 * MiB, np.float32)
    ref = weakref.ref(x)
    future = gpusaver.save_async(str(tmp_path / "r"), {"x": x, "y": np.ones(10, np.float32)},
                                 gpusaver.Options(snapshot=mode, buffer_budget=32 * MiB),
                                 on_done=lambda p: gate.wait(TIMEOUT) and p)
    del x
    gc.collect()
    try:
        assert ref() is None, "the save still holds the array after staging it"
        assert not future.done()
    finally:
        gate.set()
    future.result(TIMEOUT)


def test_host_mode_arena_is_allocated_once_and_reused(tmp_path):
    stager = Stager(gpusaver.Options(snapshot="host"))
    arrays = {"a": np.ones(MiB, np.float32), "b": np.ones(1000, np.float32), "c": np.ones(77, np.int8)}
    for i in range(3):
        gpusaver.save_async(str(tmp_path / f"h{i}"), arrays, stager.options, stager=stager).result(TIMEOUT)
        if i == 0:
            buf = stager.host_arena._buf
    assert stager.host_arena._buf is buf and stager.host_arena.nbytes >= 4 * MiB
    _check(str(tmp_path / "h2"), arrays)
    arrays["d"] = np.ones(2 * MiB, np.float32)  # a larger model grows it
    gpusaver.save_async(str(tmp_path / "h3"), arrays, stager.options, stager=stager).result(TIMEOUT)
    assert stager.host_arena.nbytes >= 12 * MiB
    _check(str(tmp_path / "h3"), arrays)


def test_arena_is_lent_to_one_save_at_a_time():
    arena = Arena()
    lease = arena.lease(1000, 100)
    got = []
    t = threading.Thread(target=lambda: got.append(arena.lease(10, 100)))
    t.start()
    t.join(0.2)
    assert not got  # the second save waits for the first's buffer
    lease.close()
    t.join(TIMEOUT)
    assert got
    got[0].close()


def test_default_stager_is_one_per_options_even_when_created_concurrently():
    opts = gpusaver.Options(buffer_budget=12345 * 64)
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        stagers = set(map(id, ex.map(lambda _: core._default_stager(opts), range(32))))
    assert len(stagers) == 1


def test_completed_saves_are_logged_at_info(tmp_path, caplog):
    import logging
    with caplog.at_level(logging.INFO, logger="gpusaver"):
        gpusaver.save(str(tmp_path / "l"), {"x": np.ones(1000, np.float32)})
    (record,) = [r for r in caplog.records if getattr(r, "gpusaver_what", None) == "save"]
    assert record.gpusaver_bytes == 4000 and record.gpusaver_prefix == str(tmp_path / "l")
