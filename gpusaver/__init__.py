"""gpusaver: GPU-aware checkpoints for TensorFlow variables, in TensorFlow's own V2 format.

``Saver`` keeps the contract of ``tf.contrib.eager.Saver``; ``save``/``save_async``/``load`` work on
plain arrays (numpy, CuPy, torch, DLPack) without TensorFlow.
"""
from gpusaver.core import load, save, save_async
from gpusaver.errors import (CheckpointNotFoundError, CorruptCheckpointError, GpusaverError, MismatchError,
                             MissingKeysError, UnsupportedError)
from gpusaver.format.state import latest_checkpoint
from gpusaver.options import Options

__all__ = ["Saver", "Options", "save", "save_async", "load", "latest_checkpoint", "GpusaverError",
           "CheckpointNotFoundError", "CorruptCheckpointError", "MismatchError", "MissingKeysError",
           "UnsupportedError"]
__version__ = "0.1.0"


def __getattr__(name):
    # The Saver needs TensorFlow; importing it lazily keeps `import gpusaver` TF-free.
    if name == "Saver":
        from gpusaver.saver import Saver
        return Saver
    raise AttributeError(f"module 'gpusaver' has no attribute {name!r}")
