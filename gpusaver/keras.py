"""``gpusaver.keras``: the Keras side of gpusaver.

``CheckpointCallback`` saves model + optimizer during ``model.fit`` in the background and lets a
restarted ``fit`` resume where the newest checkpoint was taken. Keras 3 (TensorFlow backend) and
tf-keras models alike. Importing this module imports TensorFlow and Keras; ``import gpusaver``
alone does not.
"""
from gpusaver.tf.keras import CheckpointCallback

__all__ = ["CheckpointCallback"]
