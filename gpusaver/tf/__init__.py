"""The TensorFlow / Keras side of gpusaver: object-based checkpoints (:class:`Checkpoint`).

Importing this package imports TensorFlow; ``import gpusaver`` alone does not.
"""
from gpusaver.tf.checkpoint import Checkpoint

__all__ = ["Checkpoint"]
