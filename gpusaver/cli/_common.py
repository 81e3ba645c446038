"""What the subcommands share: resolving the PATH a user typed, errors that end a command, TF's
start-up noise, and the terminal-only progress bar."""
import contextlib
import os
import sys
import tempfile

from gpusaver.format.paths import for_read
from gpusaver.format.state import STATE_FILENAME
from gpusaver.storage import for_url


class CommandError(Exception):
    """Ends a command with ``status``; the message goes to stderr (prefixed with the command)."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def resolve_prefix(path: str) -> str:
    """The checkpoint prefix that ``path`` names: a prefix, one of its files (``.index``,
    ``.data-*``), a directory (its latest checkpoint, by the ``checkpoint`` state file) or that
    state file; any of them may be a URL (``s3://bucket/dir``, configured as s3fs is: the AWS_*
    environment, ~/.aws). Raises CheckpointNotFoundError listing the checkpoints that do exist nearby."""
    path = os.fspath(path)
    if os.path.basename(path) == STATE_FILENAME and for_url(path).isfile(path):
        path = os.path.dirname(path) or "."
    return for_read(path, what="cannot read")


@contextlib.contextmanager
def quiet_native_stderr():
    """Hold what native code writes to file descriptor 2 (TensorFlow's C++ start-up lines are
    written before its log level is read) and show it only if the block fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                held.seek(0)
                sys.stderr.write(held.read().decode("utf-8", "replace"))


def import_tensorflow():
    """TensorFlow, imported (and its devices initialised) without its start-up noise on screen.
    Raises ImportError if it is not installed."""
    # The CLI, not the library, sets this: the library reads no environment. A user's own value wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet_native_stderr():
        import tensorflow as tf
        tf.config.list_logical_devices()  # device initialisation logs (cuInit...) happen here
    return tf


class _NoBar:
    def advance(self, nbytes: int):
        pass


@contextlib.contextmanager
def progress(total_bytes: int, description: str, enabled: bool = True):
    """A byte-counting progress bar on stderr when stderr is a terminal (and rich is installed,
    ``pip install gpusaver[cli]``); otherwise nothing. Yields an object with ``advance(nbytes)``."""
    if not (enabled and sys.stderr.isatty()):
        yield _NoBar()
        return
    try:
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)
    except ImportError:
        yield _NoBar()
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
               TransferSpeedColumn(), TimeRemainingColumn())
    from rich.console import Console
    # stderr, so `gpusaver verify ... > report.txt` keeps the bar off the report
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=max(total_bytes, 1))

        class _Bar:
            def advance(self, nbytes: int):
                bar.advance(task, nbytes)

        yield _Bar()


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
