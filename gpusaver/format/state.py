"""The ``checkpoint`` state file: text-format CheckpointState, as ``tf.train.latest_checkpoint`` reads it.

The directory may be local or a URL (``s3://bucket/dir``): the file is read and written through
the storage layer (:func:`gpusaver.storage.for_url`; pass ``storage`` for one with options)."""
import dataclasses
import errno
import os
import re

from gpusaver.errors import CheckpointIOError, CheckpointNotFoundError, CorruptCheckpointError
from gpusaver.storage import Storage, for_url, is_url

STATE_FILENAME = "checkpoint"
_LINE = re.compile(r"^\s*(\w+)\s*:\s*(.*?)\s*$")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "'": "'", "\\": "\\"}


@dataclasses.dataclass
class CheckpointState:
    """Paths as written in the file: relative to the directory, or absolute. Oldest first."""
    model_checkpoint_path: str
    all_model_checkpoint_paths: list[str]
    all_model_checkpoint_timestamps: list[float] = dataclasses.field(default_factory=list)
    last_preserved_timestamp: float | None = None


def _quote(s: str) -> str:
    out = []
    for b in s.encode("utf-8"):
        c = chr(b)
        if c in '"\\':
            out.append("\\" + c)
        elif 0x20 <= b < 0x7F:
            out.append(c)
        else:  # protobuf's text format writes other bytes as octal escapes
            out.append(f"\\{b:03o}")
    return '"' + "".join(out) + '"'


def _unquote(text: str, path: str) -> str:
    if len(text) < 2 or text[0] not in "\"'" or text[-1] != text[0]:
        raise CorruptCheckpointError(f"{path}: expected a quoted string, found {text!r}")
    body, out, i = text[1:-1], bytearray(), 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out += c.encode("utf-8")
            i += 1
            continue
        nxt = body[i + 1:i + 2]
        if nxt in _ESCAPES:
            out += _ESCAPES[nxt].encode()
            i += 2
        elif nxt == "x" and (m := re.match(r"[0-9a-fA-F]{1,2}", body[i + 2:])):
            out.append(int(m.group(), 16))
            i += 2 + len(m.group())
        elif m := re.match(r"[0-7]{1,3}", body[i + 1:]):
            out.append(int(m.group(), 8) & 0xFF)
            i += 1 + len(m.group())
        else:
            raise CorruptCheckpointError(
                f"{path}: bad escape {body[i:i + 2]!r} in {text!r}; expected one of \\n \\t \\r \\\" "
                f"\\' \\\\, \\xHH or \\ooo (fix or delete the state file; the checkpoints stay)")
    return out.decode("utf-8", "replace")


def state_path(directory: str) -> str:
    return os.path.join(directory, STATE_FILENAME)  # a URL's separator is "/" too (POSIX)


def read_state(directory: str, storage: Storage | None = None) -> CheckpointState | None:
    """Parse ``<directory>/checkpoint``; None if absent (or a directory of that name is there).

    Raises CorruptCheckpointError naming the file if garbled, CheckpointIOError if unreadable."""
    path = state_path(directory)
    storage = storage if storage is not None else for_url(directory)
    try:
        lines = storage.read_bytes(path, "reading the checkpoint state file").decode("utf-8", "replace").splitlines()
    except CheckpointNotFoundError:
        return None
    except CheckpointIOError as e:
        if e.errno in (errno.EISDIR, errno.ENOTDIR):  # a directory named checkpoint, or no directory
            return None
        raise
    model, paths, stamps, preserved = None, [], [], None
    for line in lines:
        if not line.strip():
            continue
        m = _LINE.match(line)
        if not m:
            raise CorruptCheckpointError(f"{path}: cannot parse line {line!r}")
        key, value = m.groups()
        try:
            if key == "model_checkpoint_path":
                model = _unquote(value, path)
            elif key == "all_model_checkpoint_paths":
                paths.append(_unquote(value, path))
            elif key == "all_model_checkpoint_timestamps":
                stamps.append(float(value))
            elif key == "last_preserved_timestamp":
                preserved = float(value)
        except ValueError:
            raise CorruptCheckpointError(f"{path}: bad number in line {line!r}") from None
    if model is None:
        raise CorruptCheckpointError(f"{path}: no model_checkpoint_path")
    return CheckpointState(model, paths, stamps, preserved)


def write_state(directory: str, state: CheckpointState, fsync: bool = False, storage: Storage | None = None) -> bool:
    """Write the state file atomically (temp file + rename), so readers never see half of it.

    ``fsync=True`` also makes it durable before and after the rename (the temp file's bytes, then
    the directory entry), for callers about to delete what the old state file named: a power loss
    then finds the old file or the new one, complete. TF does not sync it.

    Returns True when the new file is durable (``fsync`` asked and every sync succeeded). Once the
    rename has happened nothing is raised: the new state is in place even if syncing the directory
    then fails (False is returned), so a caller never undoes a save the state file already names.
    Before the rename, on failure the temp file is removed and the old state file is left as it
    was; raises CheckpointIOError naming the file (disk full, a directory named ``checkpoint`` in
    the way). On object stores the state object is one PUT, whole or not at all."""
    lines = [f"model_checkpoint_path: {_quote(state.model_checkpoint_path)}"]
    lines += [f"all_model_checkpoint_paths: {_quote(p)}" for p in state.all_model_checkpoint_paths]
    lines += [f"all_model_checkpoint_timestamps: {t!r}" for t in state.all_model_checkpoint_timestamps]
    if state.last_preserved_timestamp is not None:
        lines.append(f"last_preserved_timestamp: {state.last_preserved_timestamp!r}")
    storage = storage if storage is not None else for_url(directory)
    storage.write_bytes(state_path(directory), ("\n".join(lines) + "\n").encode("utf-8"), fsync,
                        "writing the checkpoint state file")
    if not fsync:
        return False
    try:
        storage.sync_dir(directory)
    except OSError:
        return False
    return True


def sync_dir(directory: str):
    """fsync a directory, so the renames and deletions in it survive a power loss. Raises OSError."""
    fd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resolve(directory: str, path: str) -> str:
    """A state-file path as a usable prefix (relative ones are relative to the directory)."""
    return path if os.path.isabs(path) or is_url(path) else os.path.join(directory, path)


def latest_checkpoint(directory: str, storage: Storage | None = None) -> str | None:
    """The newest complete checkpoint prefix in ``directory`` (its ``.index`` exists), else None —
    the same answer as ``tf.train.latest_checkpoint``. ``directory`` may be a URL."""
    directory = os.fspath(directory)
    storage = storage if storage is not None else for_url(directory)
    state = read_state(directory, storage)
    if state is None:
        return None
    prefix = resolve(directory, state.model_checkpoint_path)
    return prefix if storage.exists(prefix + ".index") else None
