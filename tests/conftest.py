import os

# Tests may set TF's own logging knob; the library itself reads no environment variables.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


def pytest_configure(config):
    try:
        import tensorflow as tf
    except ImportError:
        return
    # Several logical CPU devices, so device placement is testable without a GPU. Must happen
    # before TF initialises its devices, i.e. before any test touches TF.
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 3)


@pytest.fixture
def tf():
    return pytest.importorskip("tensorflow")


@pytest.fixture(scope="session")
def cupy_gpu():
    """CuPy with at least one visible GPU, else the test is skipped."""
    cupy = pytest.importorskip("cupy")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, no device
        pytest.skip(f"no CUDA device: {e}")
    if count < 1:
        pytest.skip("no CUDA device")
    return cupy
