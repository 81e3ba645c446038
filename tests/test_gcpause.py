"""Saves and restores hold the cyclic garbage collector off while they run, and give it back as
they found it, whatever the nesting, the threads or an error."""
import gc
import threading

import numpy as np
import pytest

import gpusaver
from gpusaver import gcpause


@pytest.fixture(autouse=True)
def collector_on():
    gc.enable()
    yield
    gc.enable()


def test_paused_nests_and_counts_threads():
    entered, release = threading.Event(), threading.Event()

    def other():
        with gcpause.paused():
            entered.set()
            release.wait(10)

    t = threading.Thread(target=other)
    t.start()
    entered.wait(10)
    with gcpause.paused():
        assert not gc.isenabled()
    assert not gc.isenabled()  # the other thread's phase still runs
    release.set()
    t.join()
    assert gc.isenabled()


def test_a_collector_the_caller_disabled_stays_disabled_and_errors_give_it_back():
    gc.disable()
    with gcpause.paused():
        pass
    assert not gc.isenabled()
    gc.enable()
    with pytest.raises(RuntimeError):
        with gcpause.paused():
            raise RuntimeError("boom")
    assert gc.isenabled()


def test_save_and_load_run_without_collections_and_give_the_collector_back(tmp_path):
    arrays = {f"t{i}": np.full(4, i, np.float32) for i in range(3000)}
    collections = []

    def count(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    thresholds = gc.get_threshold()
    gc.set_threshold(10)  # a collection every few allocations: a save of 3,000 tensors ran ~1,000 before
    gc.callbacks.append(count)
    try:
        gpusaver.save(str(tmp_path / "m"), arrays)
        saved = len(collections)
        loaded = gpusaver.load(str(tmp_path / "m"))
        load_collections = len(collections) - saved
    finally:
        gc.callbacks.remove(count)
        gc.set_threshold(*thresholds)
    assert gc.isenabled()
    # What is left runs outside the bulk phases (the caller's side, and once as each phase ends).
    assert saved < 50 and load_collections < 50, (saved, load_collections)
    assert all(loaded[k].tolist() == v.tolist() for k, v in arrays.items())
