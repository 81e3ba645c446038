"""Local POSIX storage: temp files renamed into place, ``preadv`` scatter reads, optional fsync.

A write goes to ``<final>.tempstate<random>`` beside the final name (TF's own suffix) and is
renamed over it at commit: ``rename`` replaces atomically, so readers see the old file or the
new one. (Keeping replaced files aside for a rollback is the commit journal's job:
:mod:`gpusaver.storage.commit`.)
"""
import os
import stat

from gpusaver.errors import CheckpointNotFoundError, CorruptCheckpointError, io_error
from gpusaver.storage.base import ReadHandle, Storage, WriteStream

_WRITE_BUFFER = 1 << 20  # coalesces the many tiny tensors of a model into large writes (bytes)
# A batch of tensors this large on average goes out by writev, uncopied: copying 105 KiB tensors
# into the buffer cost as much again as writing them (10,000 of them, 1 GiB: 0.49-0.61 s one write
# each, 0.34-0.40 s by writev, 0.36-0.39 s for one contiguous buffer; project VM, ext4).
_WRITEV_MIN_AVERAGE = 4 << 10
_IOV_MAX = 1024  # buffers per preadv or writev (Linux's limit)
_READ_SIZE = 1 << 20  # reads go in pieces this size: each is checksummed while still in the CPU cache


def temp_path(path: str) -> str:
    """A unique sibling name for writing ``path`` before the atomic rename (TF uses the same suffix)."""
    return f"{path}.tempstate{int.from_bytes(os.urandom(8), 'little')}"


def discard(path: str | None):
    """Remove ``path`` if it is there; errors are ignored (cleanup of what a failed step left)."""
    if path is not None:
        try:
            os.remove(path)
        except OSError:
            pass


def _after_short_write(views: list, i: int, written: int) -> tuple[list, int]:
    """``(views, i)`` once ``written`` bytes of ``views[i:]`` are out, fewer than all of them:
    the views written whole are skipped, the one cut short resumes where the write stopped."""
    views = list(views)
    while written >= len(views[i]):
        written -= len(views[i])
        i += 1
    views[i] = views[i][written:]
    return views, i


class LocalWriteStream(WriteStream):
    """A buffered temp file; renamed over :attr:`path` at :meth:`commit`."""

    def __init__(self, path: str, fsync: bool, what: str = "writing checkpoint data"):
        self.path = path
        self.temp_path = temp_path(path)
        self._fsync = fsync
        self._what = what
        try:
            self._file = open(self.temp_path, "wb", buffering=_WRITE_BUFFER)
        except OSError as e:
            raise io_error(e, path, what.replace("writing", "creating", 1)) from e

    def write(self, data, tensor: str | None = None):
        try:
            self._file.write(data)
        except OSError as e:
            raise io_error(e, self.path, self._what, tensor) from e

    def write_many(self, views: list, tensors: list[str]):
        if sum(map(len, views)) < _WRITEV_MIN_AVERAGE * len(views):
            super().write_many(views, tensors)  # tiny tensors: coalesced in the buffer
            return
        i = 0  # views[:i] are written
        try:
            # The buffer's bytes come first; then the file position is where writev appends
            # (BufferedWriter keeps no position of its own between flushes, without seeks).
            self._file.flush()
            fd = self._file.fileno()
            while i < len(views):
                group = views[i:i + _IOV_MAX]
                written = os.writev(fd, group)
                if written == sum(map(len, group)):  # the usual case: no loop over the views
                    i += len(group)
                else:
                    views, i = _after_short_write(views, i, written)
        except OSError as e:
            raise io_error(e, self.path, self._what, tensors[min(i, len(tensors) - 1)]) from e

    def close(self):
        try:
            self._file.flush()
            if self._fsync:
                os.fsync(self._file.fileno())
            self._file.close()
        except OSError as e:
            raise io_error(e, self.path, self._what) from e

    def commit(self):
        try:
            os.replace(self.temp_path, self.path)
        except OSError as e:
            raise io_error(e, self.path, "renaming the checkpoint file into place") from e

    def discard(self):
        try:
            self._file.close()
        except Exception:
            pass
        discard(self.temp_path)


class LocalReadHandle(ReadHandle):
    """An open file descriptor; ``preadv`` straight into the caller's buffers, GIL released."""

    read_size = _READ_SIZE

    def __init__(self, path: str):
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{path!r} not found") from None
        except OSError as e:
            raise io_error(e, path, "opening checkpoint data") from e
        info = os.fstat(self._fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(self._fd)
            raise CheckpointNotFoundError(f"{path!r} is not a regular file (a directory?)")
        self.size = info.st_size

    def readinto(self, position: int, views: list, tensor: str | None = None):
        # One scatter read where the kernel allows; short reads continue where they stopped.
        views = [v for v in views if len(v)]
        while views:
            try:
                got = os.preadv(self._fd, views[:_IOV_MAX], position)
            except OSError as e:
                raise io_error(e, self.path, "reading checkpoint data", tensor) from e
            if got <= 0:
                raise CorruptCheckpointError(f"{self.path}: unexpected end of file in {tensor!r}")
            position += got
            done = 0
            while done < len(views) and got >= len(views[done]):
                got -= len(views[done])
                done += 1
            views = views[done:]
            if got:
                views[0] = views[0][got:]

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LocalStorage(Storage):
    """The local file system (plain paths, no scheme)."""

    atomic_replace = True

    def open_write(self, path: str, fsync: bool = False, what: str = "writing checkpoint data") -> LocalWriteStream:
        return LocalWriteStream(path, fsync, what)

    def write_bytes(self, path: str, data: bytes, fsync: bool = False, what: str = "writing"):
        """Temp file + rename; on failure the temp file goes and the old file stays as it was."""
        tmp = temp_path(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            discard(tmp)
            if isinstance(e, OSError):
                raise io_error(e, path, what) from e
            raise

    def makedirs(self, directory: str):
        if directory:
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as e:
                raise io_error(e, directory, "creating the checkpoint directory") from e

    def sync_dir(self, directory: str):
        fd = os.open(directory or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def move(self, src: str, dst: str):
        try:
            os.replace(src, dst)
        except OSError as e:
            if isinstance(e, FileNotFoundError) and not os.path.lexists(src):
                raise CheckpointNotFoundError(f"{src!r} not found (moving it to {dst!r})") from None
            raise io_error(e, src, f"renaming it to {dst!r}") from e

    def delete(self, path: str):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise io_error(e, path, "deleting") from e

    def open_read(self, path: str) -> LocalReadHandle:
        return LocalReadHandle(path)

    def read_bytes(self, path: str, what: str = "reading") -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{path!r} not found") from None
        except OSError as e:  # a directory of that name, no permission, an I/O error
            raise io_error(e, path, what) from e

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isfile(self, path: str) -> bool:
        return os.path.isfile(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def list(self, directory: str) -> list[str]:
        try:
            names = os.listdir(directory or ".")
        except OSError:
            return []
        return sorted(p for p in (os.path.join(directory, n) for n in names) if os.path.isfile(p))

    def join(self, directory: str, name: str) -> str:
        return os.path.join(directory, name)

    def dirname(self, path: str) -> str:
        return os.path.dirname(path) or "."

    def isabs(self, path: str) -> bool:
        return os.path.isabs(path)
