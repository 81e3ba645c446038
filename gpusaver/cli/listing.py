"""``gpusaver ls PATH`` (alias ``inspect``): what a checkpoint holds, without reading its data."""
import functools
import json
import os
import sys

import numpy as np

from gpusaver.cli._common import CommandError, human_bytes, quiet_native_stderr, resolve_prefix
from gpusaver.errors import GpusaverError
from gpusaver.format import BundleReader, naming
from gpusaver.format.naming import OBJECT_GRAPH_KEY
from gpusaver.format.bundle import num_elements
from gpusaver.format.dtypes import DataType, enum_to_dtype
from gpusaver.storage import for_url

#: The scalar string tensor in which tf.train.Checkpoint stores its TrackableObjectGraph proto.


@functools.lru_cache(maxsize=None)  # numpy's dtype.name costs ~10 µs: per tensor, most of a listing
def dtype_name(dtype: int) -> str:
    """TensorFlow's name of a DataType enum: float32, bfloat16, string, qint8..."""
    try:
        kind = DataType(dtype)
    except ValueError:
        return f"DataType {dtype}"
    if kind == DataType.STRING or kind.name.startswith(("QINT", "QUINT")):
        return kind.name.lower()
    return enum_to_dtype(kind).name


def describe(reader: BundleReader) -> list[dict]:
    """One dict per tensor: name, dtype, shape, bytes (as stored), shard and, for partitioned
    tensors, the number of slices."""
    rows = []
    for name in reader.keys():
        entry = reader.entry(name)
        if entry.slices:  # the bytes are in the slices' entries; a full tensor's worth of them
            try:
                nbytes = num_elements(entry.shape) * enum_to_dtype(entry.dtype).itemsize
            except Exception:
                nbytes = None
        else:
            nbytes = entry.size
        row = {"name": name, "dtype": dtype_name(entry.dtype), "shape": list(entry.shape), "bytes": nbytes,
               "shard": entry.shard_id}
        if entry.slices:
            row["slices"] = len(entry.slices)
        rows.append(row)
    return rows


def object_graph_names(reader: BundleReader) -> dict[str, str] | None:
    """{checkpoint key: variable name} from the object graph tf.train.Checkpoint writes, or None if
    the checkpoint has none or TensorFlow (which owns the proto) is not installed."""
    if OBJECT_GRAPH_KEY not in reader:
        return None
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the CLI's setting, before TF loads
    try:
        with quiet_native_stderr():
            from tensorflow.core.protobuf import trackable_object_graph_pb2
    except ImportError:
        return None  # the listing stands without them
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(bytes(reader.read(OBJECT_GRAPH_KEY).reshape(())[()]))
    names = {}
    for node in graph.nodes:
        for attr in node.attributes:
            names[attr.checkpoint_key] = attr.full_name or attr.name
    return names


def listing(prefix: str) -> dict:
    with BundleReader(prefix) as reader:
        rows = describe(reader)
        names = object_graph_names(reader)
        files = [reader.index_path] + [naming.data_path(prefix, i, reader.num_shards)
                                       for i in range(reader.num_shards)]
    if names:
        for row in rows:
            if row["name"] in names:
                row["object"] = names[row["name"]]
    sizes = {f: _size(f) for f in files}
    return {"prefix": prefix, "num_shards": len(files) - 1, "tensors": rows,
            "total_tensors": len(rows), "total_bytes": sum(r["bytes"] or 0 for r in rows),
            "files": sizes, "object_graph": names is not None}


def _size(path: str) -> int | None:
    """A file's or object's bytes (local or URL), None where it is missing."""
    try:
        handle = for_url(path).open_read(path)
    except GpusaverError:
        return None
    try:
        return handle.size
    finally:
        handle.close()


def _shape(shape) -> str:
    return "[" + ",".join(map(str, shape)) + "]"


def print_listing(info: dict, out=None):
    out = out or sys.stdout
    rows = info["tensors"]
    print(f"checkpoint {info['prefix']} ({info['num_shards']} data file{'s' * (info['num_shards'] != 1)})",
          file=out)
    headers = ["name", "dtype", "shape", "bytes"] + (["object"] if info["object_graph"] else [])
    table = [[r["name"], r["dtype"], _shape(r["shape"]) + (f" ({r['slices']} slices)" if "slices" in r else ""),
              "?" if r["bytes"] is None else str(r["bytes"]), r.get("object", "")] for r in rows]
    table = [t[:len(headers)] for t in table]
    widths = [max([len(h)] + [len(t[i]) for t in table]) for i, h in enumerate(headers)]
    right = {3}  # byte counts line up on the right
    for line in [headers] + table:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        print("  ".join(cells).rstrip(), file=out)
    on_disk = sum(s for s in info["files"].values() if s is not None)
    print(f"{info['total_tensors']} tensors, {info['total_bytes']} bytes ({human_bytes(info['total_bytes'])}); "
          f"{on_disk} bytes in {len(info['files'])} files", file=out)


def _jsonable(value: np.ndarray):
    if value.dtype.kind == "O":
        return np.vectorize(lambda b: b.decode("utf-8", "backslashreplace"), otypes=[object])(value).tolist() \
            if value.size else value.tolist()
    if value.dtype.kind == "c":
        return np.stack([value.real, value.imag], axis=-1).astype(np.float64).tolist()
    if value.dtype.kind not in "biuf":  # bfloat16, float8 and friends from ml_dtypes
        return value.astype(np.float64).tolist()
    return value.tolist()


def print_tensor(prefix: str, name: str, as_json: bool, out=None):
    """The tensor's values as TF's ``inspect_checkpoint --tensor_name`` prints them: its name,
    dtype and shape, numpy's rendering of the values, and the checkpoint's total parameter count."""
    out = out or sys.stdout
    with BundleReader(prefix) as reader:
        if name not in reader:
            close = [k for k in reader.keys() if name.lower() in k.lower()][:10]
            hint = f"; did you mean: {', '.join(close)}" if close else f"; `gpusaver ls {prefix}` lists them"
            raise CommandError(f"no tensor {name!r} in checkpoint {prefix!r}{hint}")
        value = reader.read(name)
        dtype = dtype_name(reader.entry(name).dtype)
        params = sum(num_elements(reader.entry(k).shape) for k in reader.keys())
    if as_json:
        json.dump({"name": name, "dtype": dtype, "shape": list(value.shape), "values": _jsonable(value)}, out)
        out.write("\n")
    else:
        print(f"tensor: {name} ({dtype}) {list(value.shape)}", file=out)
        print(value, file=out)
        print(f"# Total number of params: {params}", file=out)


def run(args) -> int:
    prefix = resolve_prefix(args.path)
    if args.tensor is not None:
        print_tensor(prefix, args.tensor, args.json)
        return 0
    info = listing(prefix)
    if args.json:
        json.dump(info, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print_listing(info)
    return 0
