"""The TF side of the TF ⇄ CuPy exchange, on the CPU: TensorFlow's DLPack rules our GPU path
relies on (pinned here against the installed TF), TF's logical GPU → CUDA ordinal numbering, and
the adapter's pieces that run without a GPU. What needs a GPU and TF together is not provable
here (the GPU machine has no TF): see the stand-in probes of the one-shot GPU check."""
import ctypes
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gpusaver
from gpusaver.staging.cuda import dlpack
from gpusaver.staging import devices
from gpusaver.staging.devices import Device

tf = pytest.importorskip("tensorflow")
from gpusaver.tf import placement  # noqa: E402  (imports TensorFlow)
from gpusaver.tf import variables as tfvars  # noqa: E402

# tf.Tensor.__dlpack__ / __dlpack_device__ came after TF 2.16 (there: tf.experimental.dlpack.to_dlpack);
# numpy's max_version (versioned capsules) with numpy 2.1, and TF 2.16 needs numpy < 2.
_TF_TENSOR_DLPACK = hasattr(tf.constant(0.0), "__dlpack__")
needs_tensor_dlpack = pytest.mark.skipif(not _TF_TENSOR_DLPACK, reason="this TF's tf.Tensor has no __dlpack__")
needs_versioned_numpy = pytest.mark.skipif(np.lib.NumpyVersion(np.__version__) < "2.1.0",
                                           reason="numpy < 2.1 exports no versioned DLPack capsules")


def _capsule(t):
    return t.__dlpack__() if _TF_TENSOR_DLPACK else tf.experimental.dlpack.to_dlpack(t)


_set_destructor = ctypes.pythonapi.PyCapsule_SetDestructor
_set_destructor.restype = ctypes.c_int
_set_destructor.argtypes = [ctypes.py_object, ctypes.c_void_p]


# -- TensorFlow's DLPack behaviour -------------------------------------------------------------

@needs_tensor_dlpack
@pytest.mark.parametrize("stream", [0, 1, 2, -1, 0x7F00DEAD])
def test_tf_tensor_refuses_a_stream_with_runtime_error(stream):
    # cupy.from_dlpack always passes a stream and falls back only on TypeError: TF's RuntimeError
    # is why the adapter exports stream-less capsules after synchronising TF's devices.
    t = tf.constant([1.0, 2.0])
    with pytest.raises(RuntimeError, match="stream") as info:
        t.__dlpack__(stream=stream)
    assert not isinstance(info.value, TypeError)


@needs_tensor_dlpack
@pytest.mark.parametrize("kwargs", [{}, {"stream": None}, {"max_version": (1, 0)}])
def test_tf_tensor_exports_a_legacy_capsule_without_a_stream(kwargs):
    t = tf.constant([1.0, 2.0, 3.0])
    capsule = t.__dlpack__(**kwargs)
    assert dlpack.capsule_name(capsule) == dlpack.LEGACY  # max_version is ignored: never versioned
    np.testing.assert_array_equal(np.from_dlpack(dlpack.CapsuleProducer(capsule, (1, 0))), [1.0, 2.0, 3.0])


@needs_versioned_numpy
def test_tf_import_takes_legacy_capsules_and_refuses_versioned_ones():
    a = np.arange(6.0).reshape(2, 3)
    legacy, versioned = a.__dlpack__(), a.__dlpack__(max_version=(1, 0))
    assert dlpack.capsule_name(legacy) == dlpack.LEGACY
    assert dlpack.capsule_name(versioned) == dlpack.VERSIONED
    np.testing.assert_array_equal(tf.experimental.dlpack.from_dlpack(legacy).numpy(), a)
    assert dlpack.capsule_name(legacy) == b"used_dltensor"  # consumed: renamed, never imported twice
    with pytest.raises(tf.errors.InvalidArgumentError, match="dltensor"):
        tf.experimental.dlpack.from_dlpack(legacy)
    with pytest.raises(tf.errors.InvalidArgumentError, match="dltensor"):
        tf.experimental.dlpack.from_dlpack(versioned)
    assert not issubclass(tf.errors.InvalidArgumentError, (ValueError, TypeError, RuntimeError))


def test_legacy_capsule_helper_feeds_tf():
    a = np.arange(5, dtype=np.int32)  # numpy, like CuPy, gives the legacy form without max_version
    np.testing.assert_array_equal(tf.experimental.dlpack.from_dlpack(dlpack.legacy_capsule(a)).numpy(), a)


def test_tf_numbers_exported_capsules_by_its_logical_device():
    # TF writes its own logical index into a capsule's device_id: /CPU:2 → (kDLCPU, 2). For GPUs
    # that is /GPU:n → (kDLCUDA, n), which is not CUDA's ordinal n under a remap.
    with tf.device("/CPU:2"):
        t = tf.constant([1.0, 2.0]) + 1.0
    assert "CPU:2" in t.device
    if _TF_TENSOR_DLPACK:
        assert tuple(t.__dlpack_device__()) == (1, 2)
    capsule = _capsule(t)
    assert tuple(dlpack.device_field(capsule)) == (1, 2)


def test_tf_imports_a_cuda_capsule_onto_its_own_gpu_of_that_number():
    # The other direction: device_id n of a CUDA capsule is taken as TF's "GPU:n" (here unknown,
    # as this machine has no GPU), so the adapter renumbers capsules to TF's index before import.
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("needs a TF without GPUs, so that GPU:7 does not exist")
    a = np.arange(4.0)
    capsule = a.__dlpack__()
    device = dlpack.device_field(capsule)
    device[0], device[1] = 2, 7  # kDLCUDA, 7
    try:
        with pytest.raises(tf.errors.InvalidArgumentError, match="GPU:7"):
            tf.experimental.dlpack.from_dlpack(capsule)
    finally:
        # TF's failed import may already have called the deleter; never let the capsule call it again.
        _set_destructor(capsule, None)


def test_sync_devices_is_available_and_runs_without_gpus():
    assert callable(tf.test.experimental.sync_devices)  # TF >= 2.14; the adapter feature-detects it
    tfvars.sync_devices()


# -- the adapter's exchange pieces -------------------------------------------------------------

def test_capsule_renumbering_edits_only_the_device_id():
    t = tf.constant(np.arange(12, dtype=np.float32).reshape(3, 4))
    capsule = _capsule(t)
    device = dlpack.device_field(capsule)
    assert tuple(device) == (1, 0)
    device[1] = 5
    assert tuple(dlpack.device_field(capsule)) == (1, 5)
    # The rest of the struct is intact: numpy reads shape, dtype and data through it.
    out = np.from_dlpack(dlpack.CapsuleProducer(capsule, (1, 0)))
    np.testing.assert_array_equal(out, np.arange(12, dtype=np.float32).reshape(3, 4))
    with pytest.raises(ValueError):
        dlpack.device_field(capsule)  # consumed ("used_dltensor"): refused, not written


def test_exported_capsule_object_shares_where_it_lives_only():
    capsule = _capsule(tf.constant([1.0]))
    exported = dlpack.CapsuleProducer(capsule, (2, 3))
    assert exported.__dlpack_device__() == (2, 3)
    assert devices.of_array(exported) == Device("cuda", 3)
    assert exported.__dlpack__(stream=0x1234, max_version=(1, 0)) is capsule  # any stream: work is done
    assert exported.__dlpack__(dl_device=(2, 3)) is capsule
    with pytest.raises(BufferError):
        exported.__dlpack__(copy=True)
    with pytest.raises(BufferError):
        exported.__dlpack__(dl_device=(1, 0))
    assert tfvars.as_array(exported) is exported


def test_export_gpu_leaves_host_tensors_alone():
    for t in [tf.constant([1.0, 2.0]), tf.constant(["a", "b"]), tf.constant(3, tf.int64)]:
        assert tfvars.export_gpu(t) is t


def test_cpu_only_saver_never_synchronises(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(tfvars, "sync_devices", lambda: calls.append(1))
    v = tf.Variable(np.arange(3.0), name="cpu_only")
    saver = gpusaver.Saver([v])
    assert saver._on_gpu is False
    saver.save(str(tmp_path / "c"))
    assert calls == []


def test_dlpack_module_does_not_import_cupy():
    code = textwrap.dedent("""
        import sys
        import gpusaver.staging.cuda.dlpack
        assert "cupy" not in sys.modules, sorted(m for m in sys.modules if m.startswith("cupy"))
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# -- device identity: TF's logical GPU → CUDA ordinal ------------------------------------------

def _gpus(*ks):
    return [f"/physical_device:GPU:{k}" for k in ks]


def _virtual(*orders, memory=1024):
    return [tf.config.LogicalDeviceConfiguration(memory_limit=memory, experimental_device_ordinal=o)
            for o in orders]


@pytest.mark.parametrize("physical, configs, expected", [
    ([], [], ()),
    (_gpus(0), [None], (0,)),
    (_gpus(0, 1, 2, 3), [None] * 4, (0, 1, 2, 3)),                      # identity
    (_gpus(1, 3), [None, None], (1, 3)),                                 # set_visible_devices([1, 3])
    (_gpus(3, 1), [None, None], (1, 3)),                                 # TF orders by CUDA ordinal
    (_gpus(0, 1), [_virtual(None, None), _virtual(None)], (0, 0, 1)),    # 2 virtual on 0, 1 on 1
    (_gpus(2, 5), [_virtual(None, None, None), None], (2, 2, 2, 5)),     # subset + virtual devices
    (_gpus(0, 1), [None, _virtual(None, None)], (0, 1, 1)),              # unconfigured → one device
    (_gpus(0, 1), [[], _virtual(None)], (0, 1)),                         # empty list → one device
    (_gpus(0, 1), [_virtual(1, 1), _virtual(0)], (1, 0, 0)),             # experimental_device_ordinal
    (_gpus(0, 1), [_virtual(2, 0), _virtual(1, 0)], (0, 1, 1, 0)),       # sorted, ties in place
])
def test_cuda_ordinals(physical, configs, expected):
    assert placement.cuda_ordinals(physical, configs) == expected


def test_cuda_ordinals_rejects_bad_input():
    with pytest.raises(ValueError, match="physical GPU"):
        placement.cuda_ordinals(["/physical_device:CPU:0"], [None])
    with pytest.raises(ValueError):
        placement.cuda_ordinals(_gpus(0, 1), [None])  # one configuration per GPU


def test_tf_configuration_of_this_machine_maps_without_error():
    assert placement.logical_cuda_ordinals() == ()  # CPU-only: no GPUs, nothing to map
    assert placement.cuda_ordinal(0) is None
    with tf.device("/CPU:1"):
        v = tf.Variable(np.arange(3.0), name="on_cpu1")
    assert placement.target_device(v, None) == placement.device_of(v)  # CPUs are not remapped
    with pytest.raises(ValueError, match="0 logical GPU"):
        placement.target_device(v, {"/CPU:1": "/GPU:0"})


def test_restore_to_a_gpu_tf_lacks_fails_before_any_assign(tmp_path):
    a = tf.Variable(np.arange(3.0), name="first")
    b = tf.Variable(np.arange(2.0), name="second")
    saver = gpusaver.Saver([a, b])
    prefix = saver.save(str(tmp_path / "m"))
    a.assign(tf.zeros(3, tf.float64))
    with pytest.raises(ValueError, match="GPU"):
        saver.restore(prefix, device_map={"/CPU:0": "cuda:1"})
    np.testing.assert_array_equal(a.numpy(), np.zeros(3))  # nothing was assigned
