"""TensorFlow's V2 checkpoint ("tensor bundle") format: tables, entries, dtypes, state file, naming.

Imports neither TensorFlow nor CuPy; needs only numpy, ml_dtypes and crc32c. See FORMAT.md in the
project's shared notes for the byte layout.
"""
from gpusaver.format.proto import Entry
from gpusaver.format.reader import BundleReader
from gpusaver.format.writer import BundleWriter
from gpusaver.format.dtypes import DataType, dtype_to_enum, enum_to_dtype

__all__ = ["BundleReader", "BundleWriter", "Entry", "DataType", "dtype_to_enum", "enum_to_dtype"]
