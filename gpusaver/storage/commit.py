"""How a bundle's files go into place so that a reader sees the old checkpoint or the new one, never a mix.

A checkpoint's file names are fixed by TF's format (``prefix.index``, ``prefix.data-i-of-n``), so
an overwrite replaces several files one rename at a time: data first, the index last. Two things
make that window safe for gpusaver's readers:

- **A directory lock.** The writer holds an exclusive ``flock`` on the checkpoint's directory for
  the renames (milliseconds); gpusaver's reader holds a shared one while it opens the index and
  the data files. Open files stay valid after a rename, so a reader that opened a set under the
  lock keeps reading that set.
- **A journal** (``prefix.gpusaver-journal``, a few hundred bytes of JSON) written before the
  first rename and removed after the commit. It names the files being replaced, the hard links
  that keep the old ones, and the new index's temporary name. A journal found while nobody holds
  the lock belongs to a writer that died (SIGKILL, power loss) mid-commit; :func:`recover` then
  finishes the job: if the new index was renamed into place the commit happened (drop the kept
  files), otherwise the old files are put back and the new ones removed.

TensorFlow's own reader knows neither; it can see the mixed set only while a writer is inside
the rename window, or after a crash there until gpusaver next touches the prefix. TF's own saver
has the same window. Where the file system has no ``flock`` or hard links, saves still work, with
only the in-process rollback of :mod:`gpusaver.format.writer`.
"""
import contextlib
import json
import os
import threading

try:
    import fcntl
except ImportError:  # not POSIX: no directory locks
    fcntl = None

from gpusaver.errors import CorruptCheckpointError, io_error
from gpusaver.storage.local import discard, temp_path

_SUFFIX = ".gpusaver-journal"


def journal_path(prefix: str) -> str:
    return f"{prefix}{_SUFFIX}"


_held = threading.local()  # directories this thread holds exclusively (a commit's on_commit may read)


@contextlib.contextmanager
def directory_lock(prefix: str, exclusive: bool):
    """Hold a ``flock`` on ``prefix``'s directory (shared for readers, exclusive for a commit).

    Best effort: where the directory cannot be opened or locked, nothing is held. A thread that
    holds the exclusive lock (inside a commit) gets a shared one for free instead of deadlocking."""
    directory = os.path.realpath(os.path.dirname(os.fspath(prefix)) or ".")
    held = _held.__dict__.setdefault("dirs", set())
    fd = None
    if fcntl is not None and directory not in held:
        try:
            fd = os.open(directory, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError:
            if fd is not None:
                os.close(fd)
            fd = None
    if fd is not None and exclusive:
        held.add(directory)
    try:
        yield
    finally:
        if fd is not None:
            held.discard(directory)
            os.close(fd)  # closing the last descriptor releases the lock


class Journal:
    """The record of one commit in progress; create it with :meth:`begin` under the exclusive lock.

    ``files``: [(final path, path of the new file to rename over it)], the index last.
    """

    def __init__(self, prefix: str, files: list[tuple[str, str]], fsync: bool):
        self.prefix = prefix
        self.path = journal_path(prefix)
        self.fsync = fsync
        self.files = [{"path": dst, "new": src, "backup": temp_path(dst), "existed": None}
                      for src, dst in files]

    @classmethod
    def begin(cls, prefix: str, files: list[tuple[str, str]], fsync: bool) -> "Journal":
        """Write the journal, then keep each file about to be replaced as a hard link."""
        journal = cls(prefix, files, fsync)
        journal._write("replacing")
        try:
            for f in journal.files:
                f["existed"] = os.path.lexists(f["path"])
                if f["existed"]:
                    try:
                        os.link(f["path"], f["backup"])
                    except OSError:  # no hard links here: this file cannot be put back
                        f["backup"] = None
            if any(f["existed"] for f in journal.files):
                journal._write("replacing")  # now also says which files existed and which links exist
        except BaseException:
            for f in journal.files:
                discard(f["backup"])
            discard(journal.path)
            raise
        return journal

    def _write(self, phase: str):
        record = {"phase": phase, "files": [{k: os.path.basename(v) if isinstance(v, str) else v
                                             for k, v in f.items()} for f in self.files]}
        temp = temp_path(self.path)
        try:
            with open(temp, "w") as out:
                json.dump(record, out)
                if self.fsync:
                    out.flush()
                    os.fsync(out.fileno())
            os.replace(temp, self.path)
        except OSError as e:
            discard(temp)
            raise io_error(e, self.path, "writing the commit journal") from e

    def finish(self):
        """The commit is done: drop the kept files, then the journal."""
        for f in self.files:
            discard(f["backup"])
        discard(self.path)

    def roll_back(self):
        """Put the replaced files back and remove the new ones; safe to repeat after a crash."""
        self._write("rolling back")
        _restore(self.files)
        discard(self.path)


def _restore(files: list[dict]):
    """Old files back over the new ones (index first, so no old index ever meets new data in the
    final names for longer than the rollback), new-only files and leftover temporaries removed."""
    for f in reversed(files):
        if f["existed"] and f["backup"] is not None and os.path.lexists(f["backup"]):
            # Link, then rename over: the backup stays until the journal is gone, so a rollback cut
            # short can be run again.
            temp = temp_path(f["path"])
            os.link(f["backup"], temp)
            os.replace(temp, f["path"])
            discard(temp)  # rename between two links to one file does nothing (POSIX)
        elif f["existed"] is False:
            discard(f["path"])
        discard(f["new"])
    for f in files:
        discard(f["backup"])


def recover(prefix: str) -> bool:
    """Repair ``prefix`` after a writer died mid-commit; return whether a journal was found.

    Call under the exclusive directory lock (so the writer is known to be gone). Raises
    CorruptCheckpointError if the journal cannot be read, CheckpointIOError if the repair fails.
    """
    path = journal_path(prefix)
    try:
        with open(path) as f:
            record = json.load(f)
        directory = os.path.dirname(os.fspath(prefix))
        files = [{k: os.path.join(directory, v) if isinstance(v, str) else v for k, v in f.items()}
                 for f in record["files"]]
        phase = record["phase"]
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpointError(f"{path}: unreadable commit journal ({e}); the checkpoint under "
                                     f"{prefix!r} was being replaced when its writer stopped") from None
    index_renamed = files and not os.path.lexists(files[-1]["new"]) and os.path.lexists(files[-1]["path"])
    try:
        if phase == "replacing" and index_renamed:
            for f in files:  # committed: the kept old files are no longer needed
                discard(f["backup"])
        else:
            _restore(files)
        os.remove(path)
    except OSError as e:
        raise io_error(e, path, "repairing an interrupted checkpoint commit") from e
    return True
