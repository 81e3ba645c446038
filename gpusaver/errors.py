"""The library's exceptions: one hierarchy, each subclassing the natural built-in.

Catch :class:`GpusaverError` for anything gpusaver raises on purpose; catch the built-in
(``FileNotFoundError``, ``ValueError``, ``KeyError``) where existing code already does.
"""


class GpusaverError(Exception):
    """Base class of every error gpusaver raises on purpose."""


class CheckpointNotFoundError(GpusaverError, FileNotFoundError):
    """A checkpoint file (``.index`` or a ``.data`` shard) does not exist."""


class CorruptCheckpointError(GpusaverError, ValueError):
    """A checkpoint file is truncated, garbled or fails its CRC32C check.

    The message names the file and, where one is involved, the tensor.
    """


class MissingKeysError(GpusaverError, KeyError):
    """Names asked for are not in the checkpoint; ``missing`` lists them (sorted)."""

    def __init__(self, missing, path):
        self.missing = sorted(missing)
        self.path = path
        super().__init__(
            f"{len(self.missing)} key(s) not found in checkpoint {path!r}: {', '.join(self.missing)}")

    def __str__(self):  # KeyError would otherwise repr() the message
        return self.args[0]


class MismatchError(GpusaverError, ValueError):
    """A tensor in the checkpoint does not fit the variable or buffer it is restored into
    (dtype, shape or size), or two variables claim one name."""


class UnsupportedError(GpusaverError, NotImplementedError):
    """A valid checkpoint feature gpusaver does not handle (e.g. big-endian bundles)."""


class CheckpointIOError(GpusaverError, OSError):
    """Reading or writing a checkpoint file failed (disk full, a directory in the way, no
    permission). ``errno`` and ``filename`` are those of the underlying ``OSError``; the message
    names the file and, where one is involved, the tensor."""


class InvalidArgumentError(GpusaverError, ValueError):
    """An argument has the right type but cannot be used (an empty prefix, a directory where a
    prefix is written); the message says what to pass instead."""


class InvalidTypeError(GpusaverError, TypeError):
    """An argument of the wrong type (None where a prefix is expected, a tensor in ``var_list``);
    the message names it, its type and what to pass instead."""


def io_error(error: OSError, path: str, what: str = "", tensor: str | None = None) -> CheckpointIOError:
    """``error`` as a CheckpointIOError whose message names ``path`` (and ``tensor``), keeping its errno.

    ``what``: the action, e.g. ``"writing checkpoint data"``."""
    about = f" (tensor {tensor!r})" if tensor is not None else ""
    hint = {28: " (disk full: free space or save elsewhere)",
            21: " (a directory is in the way: remove it or choose another prefix)",
            13: " (no permission: choose a writable directory)"}.get(error.errno, "")
    message = f"{what or 'accessing'}{about}: {error.strerror or error}{hint}"  # str() appends the path
    out = CheckpointIOError(error.errno, message)
    out.filename = path
    return out
