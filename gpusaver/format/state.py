"""The ``checkpoint`` state file: text-format CheckpointState, as ``tf.train.latest_checkpoint`` reads it."""
import dataclasses
import os
import re

from gpusaver.errors import CorruptCheckpointError, io_error
from gpusaver.format.naming import temp_path

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
    return os.path.join(directory, STATE_FILENAME)


def read_state(directory: str) -> CheckpointState | None:
    """Parse ``<directory>/checkpoint``; None if absent (or a directory of that name is there).

    Raises CorruptCheckpointError naming the file if garbled, CheckpointIOError if unreadable."""
    path = state_path(directory)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except OSError as e:
        raise io_error(e, path, "reading the checkpoint state file") from e
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


def write_state(directory: str, state: CheckpointState):
    """Write the state file atomically (temp file + rename), so readers never see half of it.

    On failure the temp file is removed and the old state file is left as it was; raises
    CheckpointIOError naming the file (disk full, a directory named ``checkpoint`` in the way)."""
    lines = [f"model_checkpoint_path: {_quote(state.model_checkpoint_path)}"]
    lines += [f"all_model_checkpoint_paths: {_quote(p)}" for p in state.all_model_checkpoint_paths]
    lines += [f"all_model_checkpoint_timestamps: {t!r}" for t in state.all_model_checkpoint_timestamps]
    if state.last_preserved_timestamp is not None:
        lines.append(f"last_preserved_timestamp: {state.last_preserved_timestamp!r}")
    path = state_path(directory)
    tmp = temp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise io_error(e, path, "writing the checkpoint state file") from e
        raise


def resolve(directory: str, path: str) -> str:
    """A state-file path as a usable prefix (relative ones are relative to the directory)."""
    return path if os.path.isabs(path) else os.path.join(directory, path)


def latest_checkpoint(directory: str) -> str | None:
    """The newest complete checkpoint prefix in ``directory`` (its ``.index`` exists), else None —
    the same answer as ``tf.train.latest_checkpoint``."""
    state = read_state(directory)
    if state is None:
        return None
    prefix = resolve(directory, state.model_checkpoint_path)
    return prefix if os.path.exists(prefix + ".index") else None
