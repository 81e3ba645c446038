"""TensorFlow's DataType enum and its numpy equivalents (bfloat16 and float8 through ml_dtypes)."""
import enum

import ml_dtypes
import numpy as np

from gpusaver.errors import UnsupportedError


class DataType(enum.IntEnum):
    """The values of ``tensorflow.DataType`` a checkpoint can hold (tensorflow/core/framework/types.proto)."""
    FLOAT = 1
    DOUBLE = 2
    INT32 = 3
    UINT8 = 4
    INT16 = 5
    INT8 = 6
    STRING = 7
    COMPLEX64 = 8
    INT64 = 9
    BOOL = 10
    QINT8 = 11
    QUINT8 = 12
    QINT32 = 13
    BFLOAT16 = 14
    QINT16 = 15
    QUINT16 = 16
    UINT16 = 17
    COMPLEX128 = 18
    HALF = 19
    UINT32 = 22
    UINT64 = 23
    FLOAT8_E5M2 = 24
    FLOAT8_E4M3FN = 25


# Quantized types are stored as their plain integer payload, so they share numpy dtypes with the
# integers; the reverse map below therefore lists the plain types last so they win.
_TO_NUMPY = {
    DataType.QINT8: np.dtype(np.int8),
    DataType.QUINT8: np.dtype(np.uint8),
    DataType.QINT16: np.dtype(np.int16),
    DataType.QUINT16: np.dtype(np.uint16),
    DataType.QINT32: np.dtype(np.int32),
    DataType.FLOAT: np.dtype(np.float32),
    DataType.DOUBLE: np.dtype(np.float64),
    DataType.INT32: np.dtype(np.int32),
    DataType.UINT8: np.dtype(np.uint8),
    DataType.INT16: np.dtype(np.int16),
    DataType.INT8: np.dtype(np.int8),
    DataType.STRING: np.dtype(object),
    DataType.COMPLEX64: np.dtype(np.complex64),
    DataType.INT64: np.dtype(np.int64),
    DataType.BOOL: np.dtype(np.bool_),
    DataType.BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    DataType.UINT16: np.dtype(np.uint16),
    DataType.COMPLEX128: np.dtype(np.complex128),
    DataType.HALF: np.dtype(np.float16),
    DataType.UINT32: np.dtype(np.uint32),
    DataType.UINT64: np.dtype(np.uint64),
    DataType.FLOAT8_E5M2: np.dtype(ml_dtypes.float8_e5m2),
    DataType.FLOAT8_E4M3FN: np.dtype(ml_dtypes.float8_e4m3fn),
}
_FROM_NUMPY = {dt: e for e, dt in _TO_NUMPY.items()}
# numpy's bytes/str arrays are written as DT_STRING too.
_STRING_KINDS = ("O", "S", "U")


def enum_to_dtype(value: int) -> np.dtype:
    """numpy dtype for a DataType value; ``object`` for DT_STRING. Raises UnsupportedError for others."""
    try:
        return _TO_NUMPY[value]  # an int finds its DataType key: IntEnum members hash and compare as ints
    except KeyError:
        raise UnsupportedError(f"checkpoint dtype enum {value} is not supported by gpusaver") from None


def dtype_to_enum(dtype) -> DataType:
    """DataType for a numpy dtype (or anything ``np.dtype`` accepts). Raises UnsupportedError."""
    dtype = np.dtype(dtype)
    if dtype.kind in _STRING_KINDS:
        return DataType.STRING
    try:
        return _FROM_NUMPY[dtype.newbyteorder("=")]  # byte order is the writer's business
    except KeyError:
        raise UnsupportedError(f"numpy dtype {dtype} has no TensorFlow checkpoint equivalent") from None
