"""What users pass where a checkpoint prefix is expected, turned into a prefix or a clear error.

A prefix ``P`` names the files ``P.index`` and ``P.data-*``. Users also pass a directory, one of
those files, a ``pathlib.Path``, or the None that ``latest_checkpoint`` returns for an empty
directory; each is resolved (for reading) or refused with the fix (for writing). Any of them may
be a URL (``s3://bucket/dir/model``), looked up through the storage layer with ``options``'
``storage_options``.
"""
import os
import re

from gpusaver.errors import CheckpointNotFoundError, InvalidArgumentError, InvalidTypeError
from gpusaver.format import naming
from gpusaver.format.state import latest_checkpoint
from gpusaver.storage import Storage, for_url

_FILE_SUFFIX = re.compile(r"\.(index|data-\d{5}-of-\d{5})$")
_SHOWN = 10  # prefixes listed in a message


def _as_str(file_prefix, what: str) -> str:
    if file_prefix is None:
        raise InvalidTypeError(
            f"{what}: the checkpoint prefix is None; pass a prefix such as 'ckpt/model-100' (if it came "
            "from latest_checkpoint(dir) or tf.train.latest_checkpoint(dir), that directory holds no "
            "checkpoint yet)")
    try:
        path = os.fspath(file_prefix)
    except TypeError:
        raise InvalidTypeError(f"{what}: the checkpoint prefix must be a str or os.PathLike, got "
                               f"{type(file_prefix).__name__}: {file_prefix!r}") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise InvalidArgumentError(f"{what}: the checkpoint prefix is empty; pass a prefix such as "
                                   "'ckpt/model' (files ckpt/model.index and ckpt/model.data-*)")
    return path


def prefixes_in(directory: str, storage: Storage | None = None) -> list[str]:
    """Prefixes of the checkpoints (``.index`` files) in ``directory``, sorted."""
    storage = storage if storage is not None else for_url(directory)
    return sorted(f[:-len(".index")] for f in storage.list(directory) if f.endswith(".index"))


def _listing(directory: str, storage: Storage) -> str:
    found = prefixes_in(directory, storage)
    if not found:
        return f"no checkpoint (no .index file) in {directory!r}"
    more = f" and {len(found) - _SHOWN} more" if len(found) > _SHOWN else ""
    return "checkpoints there: " + ", ".join(repr(p) for p in found[:_SHOWN]) + more


def for_read(file_prefix, what: str = "restore", options=None) -> str:
    """The prefix to read for what a user passed: a prefix as it is; a directory → its latest
    checkpoint (per its ``checkpoint`` state file); ``P.index`` or ``P.data-*`` → ``P``.

    Raises InvalidTypeError (None, not a path), InvalidArgumentError (empty), and
    CheckpointNotFoundError that lists the checkpoints that do exist nearby.
    """
    path = _as_str(file_prefix, what)
    storage = for_url(path, options)
    if storage.isdir(path) and not storage.isfile(naming.index_path(path)):
        latest = latest_checkpoint(path, storage)
        if latest is None:
            raise CheckpointNotFoundError(
                f"{what}: {path!r} is a directory without a checkpoint state file naming an existing "
                f"checkpoint; pass a prefix: {_listing(path, storage)}")
        return latest
    if not storage.exists(naming.index_path(path)) and _FILE_SUFFIX.search(path):
        stripped = _FILE_SUFFIX.sub("", path)
        if storage.exists(naming.index_path(stripped)):
            return stripped
    if not storage.exists(naming.index_path(path)):
        directory = os.path.dirname(path) or "."
        where = (_listing(directory, storage) if storage.isdir(directory)
                 else f"directory {directory!r} does not exist")
        raise CheckpointNotFoundError(f"{what}: checkpoint index {naming.index_path(path)!r} not found "
                                      f"(prefix {path!r}); {where}")
    return path


def for_write(file_prefix, what: str = "save", options=None) -> str:
    """The prefix to write, checked: not None, not empty, not a directory (a prefix names files
    in one: 'dir/model'), not a checkpoint file name. Raises InvalidTypeError / InvalidArgumentError."""
    path = _as_str(file_prefix, what)
    if (path.endswith(("/", os.sep)) or os.path.basename(path) in (".", "..")
            or for_url(path, options).isdir(path)):
        raise InvalidArgumentError(
            f"{what}: {path!r} is a directory; a checkpoint prefix names files inside one, e.g. "
            f"{os.path.join(path, 'model')!r} (files model.index and model.data-*)")
    if _FILE_SUFFIX.search(path):
        raise InvalidArgumentError(
            f"{what}: {path!r} is the name of a checkpoint file; pass its prefix "
            f"{_FILE_SUFFIX.sub('', path)!r} (the .index and .data-* suffixes are added)")
    return path
