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
