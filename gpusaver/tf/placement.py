"""Where TF's variables live, in gpusaver's device terms: TF's logical ``/GPU:n`` against CUDA
ordinals, and where a restored value is staged (``device_map``).

TF numbers a capsule's CUDA device by its own logical index (``/GPU:n`` → device_id n, both ways),
which is not the CUDA ordinal under ``tf.config.set_visible_devices`` or virtual devices: this
module maps one to the other (:func:`cuda_ordinals`), so capsules are renumbered where the two
differ (:func:`gpusaver.tf.variables.assign`).
"""
import functools
import logging

import tensorflow as tf
from tensorflow.python.eager import context

from gpusaver.staging import devices
from gpusaver.staging.devices import Device

logger = logging.getLogger("gpusaver")


def device_of(var: tf.Variable) -> Device:
    return devices.parse(var.device or "cpu")


def cuda_ordinals(physical_gpus, logical_configs) -> tuple[int, ...]:
    """The CUDA ordinal behind each of TF's logical GPUs: ``result[n]`` is ``/GPU:n``'s.

    Args:
        physical_gpus: names of the physical GPUs TF uses (``tf.config.get_visible_devices("GPU")``),
            ``"/physical_device:GPU:k"``, where k is the CUDA ordinal (as ``CUDA_VISIBLE_DEVICES``
            left them), in any order.
        logical_configs: for each of them, None or a list of logical device configurations
            (``tf.config.get_logical_device_configuration``): one logical GPU each.

    TF numbers logical GPUs physical GPU by physical GPU in CUDA order (whatever the order given
    to ``set_visible_devices``), each physical GPU's virtual devices in list order, an unconfigured
    or empty-configured one as one device; virtual devices given an
    ``experimental_device_ordinal`` are sorted by it first (0 where not given), ties kept in that
    order (TF's ``BaseGPUDeviceFactory::CreateDevices``). Raises ValueError for a name that is not
    a physical GPU's, or when the two lists differ in length.
    """
    specs = []  # (device ordinal, position, CUDA ordinal)
    for k, configs in sorted(((_physical_index(name), configs)
                              for name, configs in zip(physical_gpus, logical_configs, strict=True)),
                             key=lambda pair: pair[0]):
        for config in configs or [None]:
            order = getattr(config, "experimental_device_ordinal", None) or 0
            specs.append((order, len(specs), k))
    return tuple(k for _, _, k in sorted(specs))


def _physical_index(name: str) -> int:
    kind, _, index = name.rpartition(":")
    if not kind.upper().endswith("GPU") or not index.isdigit():
        raise ValueError(f"not a physical GPU device name: {name!r} (expected '/physical_device:GPU:k')")
    return int(index)


@functools.lru_cache(maxsize=1)
def logical_cuda_ordinals() -> tuple[int, ...] | None:
    """:func:`cuda_ordinals` for this process's TF configuration, read once: () without GPUs.

    None (logged once) when TF made a different number of GPUs than its configuration implies
    (it skips GPUs it cannot use, e.g. of too low a compute capability): TF's numbering is then
    unknown, and GPU values go through the host, TF copying them across.
    """
    made = context.context().num_gpus()  # initialises TF's devices: their configuration is final
    physical = tf.config.get_visible_devices("GPU")
    ordinals = cuda_ordinals([d.name for d in physical],
                             [tf.config.get_logical_device_configuration(d) for d in physical])
    if len(ordinals) != made:
        logger.warning("TensorFlow made %d GPU device(s) from a configuration implying %d; GPU values "
                       "will be staged through host memory", made, len(ordinals))
        return None
    return ordinals


def cuda_ordinal(tf_index: int) -> int | None:
    """The CUDA ordinal of TF's ``/GPU:<tf_index>``; None where TF's numbering is unknown or
    TF has no such GPU."""
    ordinals = logical_cuda_ordinals()
    if ordinals is None or not 0 <= tf_index < len(ordinals):
        return None
    return ordinals[tf_index]


def tf_index(ordinal: int, prefer: Device) -> int:
    """TF's logical index for memory on CUDA device ``ordinal``: ``prefer``'s where it is on that
    GPU (several virtual devices may share it), else the first on it, else ``ordinal`` itself."""
    ordinals = logical_cuda_ordinals() or ()
    if prefer.is_cuda and prefer.index < len(ordinals) and ordinals[prefer.index] == ordinal:
        return prefer.index
    return ordinals.index(ordinal) if ordinal in ordinals else ordinal


def target_device(var: tf.Variable, device_map: dict | None) -> Device:
    """Where ``var``'s restored value is staged: ``device_map`` applied to its device, else the
    variable's own device.

    Keys and values are any device spelling ("/GPU:0", "cuda:0", a full TF string); their numbers
    are TF's (logical ``/GPU:n``). A GPU becomes the CUDA device behind it (index: CUDA ordinal;
    name: TF's spelling), or the host where TF's numbering is unknown. Raises ValueError for a GPU
    TF does not have.
    """
    own = device_of(var)
    target = own
    for src, dst in (device_map or {}).items():
        s = devices.parse(src)
        if (s.kind, s.index) == (own.kind, own.index):
            target = devices.parse(dst)
            break
    if not target.is_cuda:
        return target
    if logical_cuda_ordinals() is None:
        return devices.CPU
    ordinal = cuda_ordinal(target.index)
    if ordinal is None:
        raise ValueError(f"variable {var.name!r} would be restored onto {target}, but TensorFlow has "
                         f"{len(logical_cuda_ordinals())} logical GPU(s); name another in device_map")
    return Device("cuda", ordinal, target.name or f"/device:GPU:{target.index}")
