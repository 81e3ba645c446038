"""The storage protocol: where a checkpoint's bytes live, and the few operations the format needs.

Paths are strings as the user wrote them: a local path, or a URL (``s3://bucket/dir/model-1``)
for the fsspec storage. Every error is one of gpusaver's own (``gpusaver.errors``), naming the
path or URL: CheckpointNotFoundError for a missing object, CheckpointIOError for anything else.

Writes go to a *temporary object* (:meth:`Storage.open_write`) that is invisible under its final
name until :meth:`WriteStream.commit`: a local temp file renamed into place, or an S3 multipart
upload completed. A checkpoint is committed data first, its ``.index`` last and the ``checkpoint``
state object after that, so a reader never meets an index whose data is missing.
"""
import abc
import posixpath


class WriteStream(abc.ABC):
    """One object being written: bytes stream in (bounded memory, no whole-object buffer) and
    appear under :attr:`path` only at :meth:`commit`. One thread at a time."""

    path: str  # the final name

    @abc.abstractmethod
    def write(self, data, tensor: str | None = None) -> None:
        """Append ``data`` (any C-contiguous bytes-like object, not kept after the call).
        ``tensor``: named in the error if the write fails (CheckpointIOError)."""

    def write_many(self, views: list, tensors: list[str]) -> None:
        """Append ``views`` back to back (byte memoryviews, not kept after the call), ``tensors[i]``
        being the tensor ``views[i]`` belongs to: one call for a batch of small tensors."""
        for view, tensor in zip(views, tensors):
            self.write(view, tensor)

    @abc.abstractmethod
    def close(self) -> None:
        """Send every byte written (and fsync, where asked): after this, :meth:`commit` only has
        to make the object visible. Raises CheckpointIOError naming :attr:`path`."""

    @abc.abstractmethod
    def commit(self) -> None:
        """Make the object appear under :attr:`path`, replacing any object there (atomically
        where :attr:`Storage.atomic_replace`). Raises CheckpointIOError naming :attr:`path`."""

    @abc.abstractmethod
    def discard(self) -> None:
        """Drop the temporary object (an upload is aborted). Idempotent; never raises."""


class ReadHandle(abc.ABC):
    """Positional reads of one object. Safe to call from several threads at once."""

    path: str
    size: int  # bytes
    read_size: int  # bytes per call that this storage serves efficiently (a hint for callers)

    @abc.abstractmethod
    def readinto(self, position: int, views: list, tensor: str | None = None) -> None:
        """Fill ``views`` (flat byte memoryviews) in turn from the object's bytes at ``position``
        (bytes). Raises CorruptCheckpointError if the object ends first, CheckpointIOError naming
        the path (and ``tensor``) on any other failure."""

    def close(self) -> None:
        """Release the handle's resources (a file descriptor). Idempotent."""


class Storage(abc.ABC):
    """A place checkpoints are written to and read from: a local file system or an fsspec store.

    ``atomic_replace``: a commit over an existing object is an atomic rename. Object stores have
    none: there a checkpoint exists once its ``.index`` does, so writers commit the index last.
    (Local overwrites also keep the replaced files aside as hard links under a commit journal:
    :mod:`gpusaver.storage.commit`, which works on local paths only.)"""

    atomic_replace: bool = False

    # -- writing -------------------------------------------------------------------------------
    @abc.abstractmethod
    def open_write(self, path: str, fsync: bool = False, what: str = "writing checkpoint data") -> WriteStream:
        """A temporary object that becomes ``path`` at commit. ``fsync``: make it durable first
        (where the storage has the notion). ``what``: the action its errors name. Raises
        CheckpointIOError naming ``path``."""

    @abc.abstractmethod
    def write_bytes(self, path: str, data: bytes, fsync: bool = False, what: str = "writing") -> None:
        """Write a small object whole and atomically (readers see the old or the new bytes)."""

    @abc.abstractmethod
    def makedirs(self, directory: str) -> None:
        """Create ``directory`` and its parents if the storage has directories; else nothing."""

    def sync_dir(self, directory: str) -> None:
        """Make the renames in ``directory`` durable (POSIX directory fsync); else nothing."""

    @abc.abstractmethod
    def move(self, src: str, dst: str) -> None:
        """Give the object ``src`` the name ``dst``, replacing any object there, without its bytes
        passing through this process: a rename on local disks (atomic), a server-side copy and a
        delete on object stores (``dst`` appears whole or not at all; ``src`` goes only after).
        Raises CheckpointNotFoundError if ``src`` is missing, CheckpointIOError naming ``src``
        otherwise."""

    @abc.abstractmethod
    def delete(self, path: str) -> None:
        """Remove the object ``path``; nothing if it is missing. Raises CheckpointIOError."""

    # -- reading -------------------------------------------------------------------------------
    @abc.abstractmethod
    def open_read(self, path: str) -> ReadHandle:
        """Open ``path`` for positional reads. Raises CheckpointNotFoundError if it is missing or
        not a regular object (a directory), CheckpointIOError naming it otherwise."""

    @abc.abstractmethod
    def read_bytes(self, path: str, what: str = "reading") -> bytes:
        """The whole object (an index, a state file). Raises CheckpointNotFoundError if it is
        missing, CheckpointIOError naming it (and ``what``) otherwise."""

    @abc.abstractmethod
    def exists(self, path: str) -> bool:
        """Whether an object or directory ``path`` exists."""

    @abc.abstractmethod
    def isfile(self, path: str) -> bool:
        """Whether ``path`` is an object (not a directory)."""

    @abc.abstractmethod
    def isdir(self, path: str) -> bool:
        """Whether ``path`` is a directory (on object stores: a key prefix with objects below)."""

    @abc.abstractmethod
    def list(self, directory: str) -> list[str]:
        """Full paths of the objects directly in ``directory``, sorted; [] if there are none."""

    # -- names ---------------------------------------------------------------------------------
    def join(self, directory: str, name: str) -> str:
        return posixpath.join(directory, name)

    def dirname(self, path: str) -> str:
        """The directory of ``path`` ("." for a bare local name)."""
        return posixpath.dirname(path) or "."

    def isabs(self, path: str) -> bool:
        return posixpath.isabs(path)
