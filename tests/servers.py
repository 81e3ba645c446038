"""What the tests' servers (tests/seaweed.py, tests/gcs.py) and clusters share: free ports on
127.0.0.1 and a server process logging to a file."""
import os
import signal
import socket
import subprocess
import time


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (bound together, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()



class ServerProcess:
    """A server binary the tests run on 127.0.0.1, in a process group of its own, its output in
    ``log_path``. Subclasses give :meth:`_command` and :meth:`_ready` (raises until the server
    answers; programming errors — TypeError, AttributeError, NameError — stop the wait at once)."""

    what = "the server"  # for messages
    proc: subprocess.Popen | None = None
    log_path: str

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self):
        raise NotImplementedError

    def start(self, timeout: float = 60.0):
        """Start the server and wait until it answers (seconds); RuntimeError with its log's
        tail if it exits or stays silent."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.what} exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                self._ready()
                return self
            except (TypeError, AttributeError, NameError):
                self.stop()
                raise
            except Exception as e:  # not up yet: connection refused, not ready
                last = e
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.what} did not answer within {timeout:.0f} s ({last}): {self.log_tail()}")

    def kill(self):
        """SIGKILL the server's process group (as a crash would) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def stop(self):
        self.kill()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-chars:].decode("utf-8", "replace")
        except OSError:
            return "(no log)"
