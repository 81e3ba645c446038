"""gpusaver: GPU-aware checkpoints for TensorFlow variables, in TensorFlow's own V2 format.

``Saver`` keeps the contract of ``tf.contrib.eager.Saver``, ``Checkpoint`` and ``CheckpointManager``
those of ``tf.train.Checkpoint`` and ``tf.train.CheckpointManager``; ``save``/``save_async``/``load``
work on plain arrays (numpy, CuPy, torch, DLPack) without TensorFlow.
"""
from gpusaver.core import load, save, save_async
from gpusaver.errors import (CheckpointIOError, CheckpointNotFoundError, CorruptCheckpointError, GpusaverError,
                             InvalidArgumentError, InvalidTypeError, MismatchError, MissingKeysError,
                             NotConsumedError, UnsupportedError)
from gpusaver.format.state import latest_checkpoint
from gpusaver.options import Options

__all__ = ["Saver", "Checkpoint", "CheckpointManager", "Options", "save", "save_async", "load",
           "latest_checkpoint", "GpusaverError", "CheckpointNotFoundError", "CorruptCheckpointError",
           "CheckpointIOError", "InvalidArgumentError", "InvalidTypeError", "MismatchError", "MissingKeysError",
           "NotConsumedError", "UnsupportedError"]
__version__ = "0.1.0"


def __getattr__(name):
    # The Saver needs TensorFlow; importing it lazily keeps `import gpusaver` TF-free.
    if name == "Saver":
        try:
            import tensorflow  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "gpusaver.Saver needs TensorFlow, which is not installed: pip install 'gpusaver[tf]' "
                "(from a clone of the repository: pip install -e '.[tf]'). save/save_async/load work "
                "without it.") from e
        from gpusaver.tf.saver import Saver
        return Saver
    if name == "Checkpoint":
        from gpusaver.tf.checkpoint import Checkpoint
        return Checkpoint
    if name == "CheckpointManager":  # TF-free itself; lazy so `import gpusaver` stays small
        from gpusaver.manager import CheckpointManager
        return CheckpointManager
    raise AttributeError(f"module 'gpusaver' has no attribute {name!r}")
