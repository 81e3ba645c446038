"""The staging engine: async save, snapshots, budgets, shards, device placement, TF-free core."""
import filecmp
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import gpusaver
from gpusaver.format import BundleReader
from gpusaver import core
from gpusaver.staging import devices, load_pipeline
from gpusaver.staging.pool import BufferPool, HostSlabs

tf = pytest.importorskip("tensorflow")
MiB = 1 << 20


def _model(seed=0, large=4, small=50, large_elems=1 << 20):
    rng = np.random.default_rng(seed)
    vs = [tf.Variable(rng.random(large_elems, dtype=np.float32), name=f"large_{i}") for i in range(large)]
    vs += [tf.Variable(rng.random(17, dtype=np.float32), name=f"small/{i}") for i in range(small)]
    vs.append(tf.Variable(tf.constant(rng.random(33), tf.bfloat16), name="bf16"))
    return vs


def _values(vs):
    return {v.name.split(":")[0]: v.numpy().copy() for v in vs}


def _check(prefix, expected):
    loaded = gpusaver.load(prefix)
    assert set(loaded) == set(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(loaded[k], v)


@pytest.mark.parametrize("options", [
    gpusaver.Options(),
    gpusaver.Options(snapshot="copy", buffer_budget=MiB, chunk_size=256 * 1024),
    gpusaver.Options(num_shards=3, chunk_size=300 * 1024),
])
def test_async_equals_sync_byte_for_byte(tmp_path, options):
    vs = _model()
    sync = gpusaver.Saver(vs, options=options).save(str(tmp_path / "sync"))
    fut = gpusaver.Saver(vs, options=options).save_async(str(tmp_path / "async"))
    assert fut.result() == str(tmp_path / "async")
    n = options.num_shards
    for suffix in [".index"] + [f".data-{i:05d}-of-{n:05d}" for i in range(n)]:
        assert filecmp.cmp(sync + suffix, str(tmp_path / "async") + suffix, shallow=False)
    _check(sync, _values(vs))


@pytest.mark.parametrize("mode", ["reference", "copy"])
def test_snapshot_is_consistent_when_training_continues(tmp_path, mode):
    vs = _model(large=3, large_elems=4 << 20)
    before = _values(vs)
    opts = gpusaver.Options(snapshot=mode, buffer_budget=2 * MiB, chunk_size=MiB)
    future = gpusaver.Saver(vs, options=opts).save_async(str(tmp_path / "snap"))
    for v in vs:  # "training" right after save_async returns: in-place updates and assigns
        if v.dtype == tf.float32:
            v.assign_add(tf.ones_like(v))
        else:
            v.assign(tf.zeros_like(v))
    future.result()
    _check(str(tmp_path / "snap"), before)


def test_budget_smaller_than_largest_tensor(tmp_path):
    big = np.random.default_rng(3).random(3 * MiB // 8 + 5)  # ~3 MiB, odd size
    opts = gpusaver.Options(snapshot="copy", buffer_budget=MiB // 2, chunk_size=4 * MiB)
    gpusaver.save(str(tmp_path / "b"), {"big": big, "tiny": np.ones(1)}, opts)
    _check(str(tmp_path / "b"), {"big": big, "tiny": np.ones(1)})
    loaded = gpusaver.load(str(tmp_path / "b"), ["big"], options=opts)
    np.testing.assert_array_equal(loaded["big"], big)


def test_load_reads_ahead_within_the_budget(tmp_path):
    tensors = {f"t{i:02d}": np.full(64 * 1024, i, np.float32) for i in range(40)}  # 256 KiB each
    tensors.update({f"s{i:03d}": np.full(10, i, np.int32) for i in range(300)})
    gpusaver.save(str(tmp_path / "r"), tensors)
    opts = gpusaver.Options(buffer_budget=MiB, num_threads=4)
    stager = core.Stager(opts)
    lock = threading.Lock()
    held = {"now": 0, "peak": 0}  # bytes fetched and not yet consumed
    slabs = HostSlabs()

    def fetch(batch):
        values = stager.fetch(reader, batch, slabs)
        with lock:
            held["now"] += sum(v.nbytes for v in values)
            held["peak"] = max(held["peak"], held["now"])
        return values

    seen = []
    with BundleReader(str(tmp_path / "r")) as reader:
        requests = [(name, devices.Device("cpu", 0)) for name in reversed(tensors)]
        for name, value in load_pipeline.load_iter(reader, requests, opts, fetch):
            np.testing.assert_array_equal(value, tensors[name])
            time.sleep(0.002)  # a slow consumer: the readers must wait for it, not run ahead
            with lock:
                held["now"] -= value.nbytes
            seen.append(name)
    assert sorted(seen) == sorted(tensors)
    assert held["peak"] <= opts.buffer_budget + load_pipeline._BATCH_BYTES


def test_pool_never_exceeds_budget():
    pool = BufferPool(budget=3 * MiB, buffer_size=MiB)
    bufs = [pool.acquire() for _ in range(3)]
    assert pool.acquire(cancelled=lambda: True) is None  # would block: all three are out
    pool.release(bufs.pop())
    assert pool.acquire() is not None and pool.allocated_bytes == 3 * MiB


def test_background_error_surfaces_in_result(tmp_path):
    (tmp_path / "file").write_text("x")
    saver = gpusaver.Saver(_model(large=1, small=2))
    future = saver.save_async(str(tmp_path / "file" / "ckpt"))
    with pytest.raises(OSError):
        future.result()
    with pytest.raises(OSError):
        saver.wait()
    assert saver.save(str(tmp_path / "ok")) == str(tmp_path / "ok")  # the Saver is still usable


def test_one_save_in_flight_and_state_names_only_complete_checkpoints(tmp_path):
    vs = _model(large=2, large_elems=2 << 20)
    saver = gpusaver.Saver(vs)
    first = saver.save_async(str(tmp_path / "m"), global_step=1)
    second = saver.save_async(str(tmp_path / "m"), global_step=2)  # waits for the first
    assert first.done()
    assert second.result() == str(tmp_path / "m-2")
    assert tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-2")
    assert not list(tmp_path.glob("*tempstate*"))


def test_interpreter_exit_waits_for_inflight_save(tmp_path):
    prefix = tmp_path / "exit"
    code = textwrap.dedent(f"""
        import numpy as np, gpusaver
        arrays = {{f"t{{i}}": np.random.rand(1 << 20) for i in range(20)}}  # 160 MiB
        gpusaver.save_async({str(prefix)!r}, arrays)
        np.save({str(tmp_path / 'expected.npy')!r}, arrays["t19"])
    """)  # the script ends right after save_async returns
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    with BundleReader(str(prefix)) as r:
        assert len(r.keys()) == 20
        np.testing.assert_array_equal(r.read("t19"), np.load(tmp_path / "expected.npy"))


def test_parallel_shards_are_one_valid_tf_checkpoint(tmp_path):
    vs = _model(large=5, small=30)
    prefix = gpusaver.Saver(vs, options=gpusaver.Options(num_shards=4)).save(str(tmp_path / "s"))
    assert len(list(tmp_path.glob("s.data-*-of-00004"))) == 4
    reader = tf.train.load_checkpoint(prefix)
    for name, value in _values(vs).items():
        np.testing.assert_array_equal(reader.get_tensor(name), value)


def test_device_parsing():
    assert devices.parse("/job:localhost/replica:0/task:0/device:GPU:1").index == 1
    assert devices.parse("/GPU:0").is_cuda and devices.parse("cuda:2").index == 2
    assert devices.parse("/device:CPU:2") == devices.Device("cpu", 2, "/device:CPU:2")
    assert devices.of_array(np.ones(3)) == devices.CPU
    with pytest.raises(ValueError, match="TPU"):
        devices.parse("/TPU:0")


def test_restore_onto_own_and_mapped_logical_devices(tmp_path):
    from gpusaver.tf import placement
    cpus = tf.config.list_logical_devices("CPU")
    assert len(cpus) >= 3, "conftest configures three logical CPUs"
    with tf.device("/CPU:1"):
        a = tf.Variable(np.arange(4.0), name="on1")
    with tf.device("/CPU:2"):
        b = tf.Variable(np.arange(3.0), name="on2")
    saver = gpusaver.Saver([a, b])
    prefix = saver.save(str(tmp_path / "d"))

    assert placement.target_device(a, None).index == 1
    mapping = {"/CPU:1": "/device:CPU:0"}
    assert placement.target_device(a, mapping).index == 0
    assert placement.target_device(b, mapping).index == 2

    a.assign(tf.zeros(4, tf.float64))
    b.assign(tf.zeros(3, tf.float64))
    saver.restore(prefix, device_map=mapping)
    np.testing.assert_array_equal(a.numpy(), np.arange(4.0))
    np.testing.assert_array_equal(b.numpy(), np.arange(3.0))
    assert "CPU:1" in a.device and "CPU:2" in b.device


def test_snapshot_of_many_variables_over_devices_keeps_order_and_placement():
    from gpusaver.tf import variables as tfvars
    vs = []
    for i in range(700):  # several read groups per device, mixed dtypes within a group
        with tf.device(f"/CPU:{i % 2 + 1}"):
            vs.append(tf.Variable(i, dtype=tf.int64 if i % 3 else tf.float32))
    values = tfvars.SnapshotReader(vs)()
    assert [int(v.numpy()) for v in values] == list(range(700))
    assert all(v.dtype == var.dtype and v.device == var.device for v, var in zip(values, vs))


def test_framework_neutral_api_without_tensorflow(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("tensorflow", "cupy", "keras"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import numpy as np, gpusaver
        arrays = {{"a": np.arange(10.0), "s": np.array(["x", "yz"]), "m": memoryview(b"abc")}}
        gpusaver.save({str(tmp_path / 'n')!r}, arrays)
        out = gpusaver.load({str(tmp_path / 'n')!r}, keys=["s", "a"])
        assert list(out) == ["s", "a"]  # the order asked for, not the order in the file
        assert (out["a"] == np.arange(10.0)).all() and list(out["s"]) == [b"x", b"yz"]
        assert list(gpusaver.load({str(tmp_path / 'n')!r}, ["m"])["m"]) == [97, 98, 99]
        assert "tensorflow" not in sys.modules
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_host_slabs_hand_out_aligned_pieces_that_never_overlap():
    """Reader threads carve a load's memory concurrently: every piece starts on a 64-byte
    boundary, none overlaps another, and pieces above an eighth of a slab get memory of their own."""
    slabs = HostSlabs(slab_bytes=1 << 16)
    sizes = [1, 63, 64, 65, 4000, 0, 8192, 8193, 100]
    taken, lock = [], threading.Lock()

    def carve(seed):
        mine = [(slabs.region(n), n) for n in np.random.default_rng(seed).permutation(sizes * 20)]
        with lock:
            taken.extend(mine)

    threads = [threading.Thread(target=carve, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans = sorted((piece.ctypes.data, piece.ctypes.data + n) for piece, n in taken if n)
    assert all(start % 64 == 0 for start, _ in spans)
    assert all(prev_end <= start for (_, prev_end), (start, _) in zip(spans, spans[1:]))
    assert all(len(piece) == n for piece, n in taken)
    alone = [piece for piece, n in taken if n > slabs.max_piece]
    assert alone and all(piece.base.nbytes < slabs.slab_bytes for piece in alone)
