"""Object stores and other file systems through fsspec: ``s3://``, ``gs://``, ``memory://``, ``file://``.

fsspec (and s3fs, gcsfs) are imported here only, when a URL is first used; without them a clear
ImportError names the extra to install. Paths stay the URLs the user wrote.

Writes stream: on S3 and GCS a data object is a multipart (resumable) upload whose parts leave
as they fill (:data:`PART_SIZE` bytes each: an object being written holds at most one part plus
the chunk being written in memory), completed only at commit — until then the object does not
exist, and a failed save aborts the upload (a server that died keeps the parts until its own
clean-up: S3 lifecycle rules). S3 allows 10,000 parts, so one data object holds up to 312 GiB;
larger checkpoints use ``Options(num_shards=...)``. Other stores write a ``.tempstate`` object
and move it into place at commit. Reads fetch byte ranges, several at once (:data:`RANGE_SIZE`
each, :data:`READ_SIZE` per call), and copy them into the caller's buffers.
"""
import contextlib
import errno
import posixpath

from gpusaver.errors import CheckpointIOError, CheckpointNotFoundError, CorruptCheckpointError, GpusaverError
from gpusaver.storage.base import ReadHandle, Storage, WriteStream
from gpusaver.storage.local import temp_path

MiB = 1 << 20
PART_SIZE = 32 * MiB  # bytes per uploaded part (S3: >= 5 MiB but the last, <= 10,000 parts); larger was faster
RANGE_SIZE = 8 * MiB  # bytes per ranged GET
READ_SIZE = 32 * MiB  # bytes a reader asks for per call: RANGE_SIZE ranges fetched concurrently
_DEFERRED_COMMIT = {"s3", "s3a", "gs", "gcs"}  # file objects that upload now and commit later
_ATOMIC_RENAME = {"file", "local"}
_EXTRA = "pip install 'gpusaver[remote]'"  # fsspec, s3fs (s3://) and gcsfs (gs://)
_GCS = ("gs://", "gcs://")


def _import_fsspec(url: str):
    try:
        import fsspec
    except ImportError:
        raise ImportError(f"{url!r} is a URL, which gpusaver reads and writes through fsspec (and s3fs "
                          f"for s3://, gcsfs for gs://); it is not installed: {_EXTRA}") from None
    return fsspec


def _hint(error: BaseException, path: str = "") -> str:
    """The likely fix for ``error`` met at ``path`` (a URL), as a parenthesised suffix, or ""."""
    name, text = type(error).__name__, str(error)
    gcs = path.startswith(_GCS)
    if (isinstance(error, PermissionError) or "Credential" in name or "Auth" in name or "Refresh" in name
            or text.startswith(("Forbidden", "Unauthorized")) or getattr(error, "code", None) in (401, 403)):
        how = ("Options(storage_options={'token': ...}) (a service-account JSON file, 'google_default', "
               "'anon'), or GOOGLE_APPLICATION_CREDENTIALS for gs://" if gcs else
               "Options(storage_options={'key': ..., 'secret': ...}), or AWS_ACCESS_KEY_ID / "
               "AWS_SECRET_ACCESS_KEY / ~/.aws for s3://")
        return f" (no access: check the credentials and the bucket's policy — {how})"
    if isinstance(error, (ConnectionError, TimeoutError)) or "Connect" in name or "Endpoint" in name:
        how = ("{'endpoint_url': ...}" if gcs else "{'client_kwargs': {'endpoint_url': ...}}")
        return (" (cannot reach the storage server: check that it runs and the endpoint, e.g. "
                f"Options(storage_options={how}))")
    return ""


def _io_error(error: BaseException, path: str, what: str, tensor: str | None = None) -> CheckpointIOError:
    """``error`` (from fsspec, s3fs, botocore) as a CheckpointIOError naming the URL, with the fix."""
    code = getattr(error, "errno", None)
    if not isinstance(code, int):
        code = errno.EACCES if isinstance(error, PermissionError) else errno.EIO
    about = f" (tensor {tensor!r})" if tensor is not None else ""
    text = str(error) or type(error).__name__
    hint = _hint(error, path)
    if not hint and isinstance(error, FileNotFoundError) and any(w in what for w in ("writing", "creating", "committing")):
        hint = " (does the bucket exist? gpusaver does not create buckets)"
    return CheckpointIOError(code, f"{what}{about}: {text}{hint}", path)


@contextlib.contextmanager
def _errors(path: str, what: str, tensor: str | None = None, missing: str | None = None):
    """Turn what fsspec raises into gpusaver's errors; programming errors pass through.
    ``missing``: the message of the CheckpointNotFoundError for a missing object."""
    try:
        yield
    except (GpusaverError, TypeError, AttributeError, NameError, AssertionError):
        raise
    except FileNotFoundError as e:
        if missing is None:
            raise _io_error(e, path, what, tensor) from e
        raise CheckpointNotFoundError(missing) from None
    except Exception as e:
        raise _io_error(e, path, what, tensor) from e


class FsspecWriteStream(WriteStream):
    """An fsspec file object under the final key, committed later (S3, GCS), or a temp object
    moved into place at commit (other stores)."""

    def __init__(self, storage: "FsspecStorage", path: str, what: str = "writing checkpoint data"):
        self.path = path
        self._what = what
        self._storage = storage
        self._fs = storage.fs
        self._deferred = storage.deferred_commit
        # The temp object of non-deferred stores lives beside the final one, as on local disks.
        self._key = storage.key(path) if self._deferred else storage.key(temp_path(path))
        self._closed = self._done = False
        with _errors(path, what.replace("writing", "creating", 1)):
            if self._deferred:
                self._file = self._fs.open(self._key, "wb", block_size=PART_SIZE, autocommit=False)
            else:
                self._file = self._fs.open(self._key, "wb", block_size=PART_SIZE)

    def write(self, data, tensor: str | None = None):
        view = memoryview(data).cast("B")
        with _errors(self.path, self._what, tensor):
            # In slices: the file object copies a write whole into its buffer before uploading.
            for start in range(0, len(view), PART_SIZE):
                self._file.write(view[start:start + PART_SIZE])

    def close(self):
        with _errors(self.path, self._what):
            self._file.close()
        self._closed = True

    def commit(self):
        with _errors(self.path, "committing the checkpoint object"):
            if self._deferred:
                self._file.commit()
            else:
                self._fs.mv(self._key, self._storage.key(self.path))
        self._done = True

    def discard(self):
        if self._done:
            return
        self._done = True
        try:
            if self._deferred:
                try:
                    self._file.discard()  # aborts the multipart upload: no object, no parts left
                finally:  # not closed in fsspec's eyes: its finalizer would try to upload the rest
                    self._file.closed = True
            else:
                if not self._closed:
                    self._file.close()
                self._fs.rm_file(self._key)
        except Exception:
            pass


class FsspecReadHandle(ReadHandle):
    """Ranged reads of one object; a read of several ranges fetches them concurrently."""

    read_size = READ_SIZE

    def __init__(self, storage: "FsspecStorage", path: str):
        self.path = path
        self._fs = storage.fs
        self._key = storage.key(path)
        info = storage.info(path, "opening checkpoint data", missing=f"{path!r} not found")
        if info.get("type") != "file":
            raise CheckpointNotFoundError(f"{path!r} is not an object (a directory?)")
        self.size = int(info["size"])

    def readinto(self, position: int, views: list, tensor: str | None = None):
        views = [v for v in views if len(v)]
        total = sum(len(v) for v in views)
        if not total:
            return
        if position + total > self.size:
            raise CorruptCheckpointError(f"{self.path}: unexpected end of file in {tensor!r}")
        vi, voff = 0, 0  # where the next byte goes: views[vi][voff]
        # READ_SIZE bytes at a time (the memory a call holds), in RANGE_SIZE requests run concurrently.
        for batch in range(position, position + total, READ_SIZE):
            stop = min(batch + READ_SIZE, position + total)
            starts = list(range(batch, stop, RANGE_SIZE))
            ends = [min(s + RANGE_SIZE, stop) for s in starts]
            with _errors(self.path, "reading checkpoint data", tensor):
                pieces = self._fs.cat_ranges([self._key] * len(starts), starts, ends, on_error="raise")
            for piece, start, end in zip(pieces, starts, ends):
                if len(piece) != end - start:
                    raise CorruptCheckpointError(f"{self.path}: unexpected end of file in {tensor!r}")
                piece = memoryview(piece)
                while len(piece):
                    view = views[vi]
                    n = min(len(piece), len(view) - voff)
                    view[voff:voff + n] = piece[:n]
                    piece = piece[n:]
                    voff += n
                    if voff == len(view):
                        vi, voff = vi + 1, 0


class FsspecStorage(Storage):
    """One fsspec file system, chosen by the URL's scheme, with the user's storage options.

    Directory listings are not cached (``use_listings_cache=False`` unless given), so objects
    another process wrote are seen."""

    def __init__(self, url: str, protocol: str, storage_options: dict | None = None):
        fsspec = _import_fsspec(url)
        options = dict(storage_options or {})
        options.setdefault("use_listings_cache", False)
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as e:  # fsspec knows the scheme, its package (s3fs, gcsfs) is missing
            raise ImportError(f"cannot use {url!r}: {e} ({_EXTRA} installs s3fs for s3:// and "
                              "gcsfs for gs://)") from None
        except ValueError as e:
            raise ImportError(f"cannot use {url!r}: fsspec has no file system for {protocol!r}:// ({e})") from None
        # gcsfs checks its credentials here (a token file that is not one, a refresh that fails).
        with _errors(url, "connecting with the storage options' credentials"):
            try:
                self.fs = fsspec.filesystem(protocol, **options)
            except (KeyError, ValueError) as e:  # a malformed token or key: a credentials problem
                raise PermissionError(f"{type(e).__name__}: {e}") from e
        self.protocol = protocol
        self.deferred_commit = protocol in _DEFERRED_COMMIT
        self.atomic_replace = protocol in _ATOMIC_RENAME

    def key(self, path: str) -> str:
        """The path as the fsspec file system names it (the URL without its scheme)."""
        return self.fs._strip_protocol(path)

    def info(self, path: str, what: str = "looking up", missing: str | None = None) -> dict:
        with _errors(path, what, missing=missing):
            return self.fs.info(self.key(path))

    # -- writing -------------------------------------------------------------------------------
    def open_write(self, path: str, fsync: bool = False, what: str = "writing checkpoint data") -> FsspecWriteStream:
        return FsspecWriteStream(self, path, what)

    def write_bytes(self, path: str, data: bytes, fsync: bool = False, what: str = "writing"):
        with _errors(path, what):
            if self.atomic_replace:  # a local file system: temp + rename, as LocalStorage does
                tmp = self.key(temp_path(path))
                try:
                    self.fs.pipe_file(tmp, data)
                    self.fs.mv(tmp, self.key(path))
                except BaseException:
                    with contextlib.suppress(Exception):
                        self.fs.rm_file(tmp)
                    raise
            else:  # one PUT: the object is replaced whole or not at all
                self.fs.pipe_file(self.key(path), data)

    def makedirs(self, directory: str):
        if self.deferred_commit or not directory:
            return  # object stores have no directories (and creating buckets is not our business)
        with _errors(directory, "creating the checkpoint directory"):
            self.fs.makedirs(self.key(directory), exist_ok=True)

    def move(self, src: str, dst: str):
        # fsspec's mv is copy + delete: S3's CopyObject (UploadPartCopy above 5 GiB) and GCS's
        # moveTo or rewrite run in the server, so the bytes never come here; the copy appears whole.
        with _errors(src, f"moving it to {dst!r}", missing=f"{src!r} not found (moving it to {dst!r})"):
            self.fs.mv(self.key(src), self.key(dst))

    def delete(self, path: str):
        with contextlib.suppress(CheckpointNotFoundError), _errors(path, "deleting", missing=""):
            self.fs.rm_file(self.key(path))

    # -- reading -------------------------------------------------------------------------------
    def open_read(self, path: str) -> FsspecReadHandle:
        return FsspecReadHandle(self, path)

    def read_bytes(self, path: str, what: str = "reading") -> bytes:
        missing = f"{path!r} not found"
        if self.info(path, what, missing=missing).get("type") != "file":
            raise CheckpointNotFoundError(missing)
        with _errors(path, what, missing=missing):
            return self.fs.cat_file(self.key(path))

    def _type(self, path: str) -> str | None:
        try:
            return self.info(path, "looking up", missing="").get("type")
        except CheckpointNotFoundError:
            return None

    def exists(self, path: str) -> bool:
        return self._type(path) is not None

    def isfile(self, path: str) -> bool:
        return self._type(path) == "file"

    def isdir(self, path: str) -> bool:
        return self._type(path) == "directory"

    def list(self, directory: str) -> list[str]:
        try:
            with _errors(directory, "listing", missing=""):
                entries = self.fs.ls(self.key(directory), detail=True)
        except CheckpointNotFoundError:
            return []
        base = directory.rstrip("/")
        return sorted(posixpath.join(base, posixpath.basename(e["name"].rstrip("/")))
                      for e in entries if e.get("type") == "file")

    # -- names ---------------------------------------------------------------------------------
    def dirname(self, path: str) -> str:
        head, _, _ = path.rstrip("/").rpartition("/")
        return head if "://" in head and not head.endswith(":/") else path.split("://")[0] + "://"

    def isabs(self, path: str) -> bool:
        return "://" in path
