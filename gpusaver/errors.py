"""The library's exceptions: one hierarchy, each subclassing the natural built-in.

Catch :class:`GpusaverError` for anything gpusaver raises on purpose; catch the built-in
(``FileNotFoundError``, ``ValueError``, ``KeyError``) where existing code already does.
"""
import difflib
import re


class GpusaverError(Exception):
    """Base class of every error gpusaver raises on purpose."""


class CheckpointNotFoundError(GpusaverError, FileNotFoundError):
    """A checkpoint file (``.index`` or a ``.data`` shard) does not exist."""


class CorruptCheckpointError(GpusaverError, ValueError):
    """A checkpoint file is truncated, garbled or fails its CRC32C check.

    The message names the file and, where one is involved, the tensor.
    """


class MissingKeysError(GpusaverError, KeyError):
    """Names asked for are not in the checkpoint.

    Attributes: ``missing`` (sorted), ``path``; when the caller passed the checkpoint's names
    (``available``, or ``closest`` computed already), ``closest`` {missing name: up to 3 names the
    checkpoint does have, best first} for the first :data:`SHOWN` missing names; ``fix``, what to
    do instead. All of it is in the message.
    """

    SHOWN = 10  # missing names given their closest matches in the message

    def __init__(self, missing, path, available=None, fix: str | None = None, closest: dict | None = None):
        self.missing = sorted(missing)
        self.path = path
        self.fix = fix
        self.closest = closest or {}
        lines = [f"{len(self.missing)} key(s) not found in checkpoint {path!r}: {', '.join(self.missing)}"]
        if available is not None and closest is None:
            self.closest = closest_names(self.missing[:self.SHOWN], list(available), pair_from=self.missing)
        if self.closest:
            lines.append("closest names in the checkpoint:")
            lines += [f"  {name!r}: {', '.join(map(repr, near)) or '(none similar)'}"
                      for name, near in self.closest.items()]
            if len(self.missing) > self.SHOWN:
                lines.append(f"  ... and {len(self.missing) - self.SHOWN} more")
        if fix:
            lines.append(f"fix: {fix}")
        super().__init__("\n".join(lines))

    def __str__(self):  # KeyError would otherwise repr() the message
        return self.args[0]


_SUFFIX = re.compile(r"_(\d+)(?=/|$)")
_VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"  # an object-based checkpoint's key for a variable's value


def without_numbering(name: str) -> str:
    """``name`` without the ``_<n>`` suffixes Keras and TF add to make names unique
    (``sequential_1/dense_3/kernel`` -> ``sequential/dense/kernel``), and without the
    ``/.ATTRIBUTES/VARIABLE_VALUE`` of object-based checkpoint keys."""
    return _SUFFIX.sub("", name.removesuffix(_VALUE_SUFFIX))


def _numbering(name: str) -> list[int]:
    # Each path component's suffix number, -1 for none: the order in which the names were made.
    return [int(m.group(1)) if (m := re.search(r"_(\d+)$", part)) else -1 for part in name.split("/")]


def closest_names(names: list[str], available: list[str], n: int = 3,
                  pair_from: list[str] | None = None) -> dict[str, list[str]]:
    """{name: up to ``n`` names of ``available`` most like it, best first}.

    Names equal up to auto-numbering suffixes (and an object-based key's
    ``/.ATTRIBUTES/VARIABLE_VALUE``) come first. Where ``pair_from`` (all the names
    looked for, default ``names``) and ``available`` hold equally many of one such family, they
    are paired in creation order (a second Keras model's ``sequential_1/dense_2``, ``.../dense_3``
    ↔ the first's ``sequential/dense``, ``.../dense_1``); then difflib's closest matches.
    """
    families: dict[str, list[str]] = {}
    for a in available:
        families.setdefault(without_numbering(a), []).append(a)
    wanted: dict[str, list[str]] = {}
    for name in pair_from if pair_from is not None else names:
        wanted.setdefault(without_numbering(name), []).append(name)
    paired = {}
    for family, members in wanted.items():
        found = families.get(family, [])
        if len(found) == len(members):
            paired.update(zip(sorted(members, key=_numbering), sorted(found, key=_numbering)))
    out = {}
    for name in names:
        first = [paired[name]] if name in paired else []
        same = [a for a in families.get(without_numbering(name), []) if a != name]
        similar = difflib.get_close_matches(name, available, n=n, cutoff=0.5)
        out[name] = list(dict.fromkeys(first + same + similar))[:n]
    return out


class NotConsumedError(GpusaverError, AssertionError):
    """A restore status's ``assert_consumed()`` found checkpoint values no variable took (or
    variables the checkpoint had no value for); ``unused`` and ``missing`` list them. An
    AssertionError, as TF's ``assert_consumed()`` raises."""

    def __init__(self, message: str, unused=(), missing=()):
        self.unused = list(unused)
        self.missing = list(missing)
        super().__init__(message)


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
