"""``gpusaver verify PATH``, ``gpusaver diff A B`` and ``gpusaver latest DIR``.

Both ``verify`` and ``diff`` read tensors in pieces of ``CHUNK`` bytes through one reused buffer,
so a checkpoint of any size is checked in bounded memory (a string tensor, which cannot be checked
piecewise, is read whole).
"""
import json
import sys
import time

import numpy as np

from gpusaver.cli._common import CommandError, human_bytes, progress, resolve_prefix
from gpusaver.cli.listing import dtype_name
from gpusaver.errors import CorruptCheckpointError, GpusaverError
from gpusaver.format import BundleReader, naming
from gpusaver.format.bundle import num_elements
from gpusaver.format.dtypes import DataType, enum_to_dtype
from gpusaver.storage import for_url
from gpusaver.format.state import latest_checkpoint, read_state
from gpusaver.format.wire import crc32c

CHUNK = 8 << 20  # bytes read (and checksummed) at a time


# --- verify -------------------------------------------------------------------------------------
def _slice_parts(reader: BundleReader, name: str, entry) -> list[tuple[str, object]]:
    """The (label, entry) of each slice of a partitioned tensor, after checking that the slices
    lie inside the tensor, do not overlap and cover it completely (TF refuses anything else)."""
    boxes, parts = [], []
    for extents in entry.slices:
        if len(extents) != len(entry.shape):
            raise CorruptCheckpointError(f"{reader.index_path}: a slice of {name!r} has rank {len(extents)}, "
                                         f"the tensor has {len(entry.shape)}")
        box = []
        for e, dim in zip(extents, entry.shape):
            stop = dim if e.length is None else e.start + e.length
            if not 0 <= e.start <= stop <= dim:
                raise CorruptCheckpointError(f"{reader.index_path}: slice {e.start}:{stop} of {name!r} lies "
                                             f"outside its dimension of {dim}")
            box.append((e.start, stop))
        label = name + "[" + ",".join(f"{a}:{b}" for a, b in box) + "]"
        try:
            # Slice entries sit under binary OrderedCode keys that the public lookup cannot spell.
            part = reader._entry(naming.slice_key(name, extents), label)
        except KeyError:
            raise CorruptCheckpointError(f"{reader.index_path}: slice {label} of {name!r} is missing") from None
        if tuple(part.shape) != tuple(b - a for a, b in box) or part.dtype != entry.dtype:
            raise CorruptCheckpointError(f"{reader.index_path}: slice {label} has shape {list(part.shape)} "
                                         f"and {dtype_name(part.dtype)}, expected {[b - a for a, b in box]} "
                                         f"and {dtype_name(entry.dtype)}")
        for other, other_label in boxes:
            if all(a < d and c < b for (a, b), (c, d) in zip(box, other)):
                raise CorruptCheckpointError(f"{reader.index_path}: slices {other_label} and {label} of "
                                             f"{name!r} overlap")
        boxes.append((box, label))
        parts.append((label, part))
    covered = sum(num_elements([b - a for a, b in box]) for box, _ in boxes)
    if covered != num_elements(entry.shape):
        raise CorruptCheckpointError(f"{reader.index_path}: the slices of {name!r} cover {covered} of its "
                                     f"{num_elements(entry.shape)} elements")
    return parts


def _check_bytes(reader: BundleReader, name: str, entry, buf: memoryview, bar):
    """Read one stored tensor (or slice) piece by piece and check its CRC32C."""
    if entry.dtype == DataType.STRING:  # lengths, then a CRC over them, then the bytes: read whole
        reader._read(name, entry)  # raises on a bad checksum; slices have no public name to read by
        bar.advance(entry.size)
        return
    crc = 0
    for start in range(0, entry.size, CHUNK):
        piece = buf[:min(CHUNK, entry.size - start)]
        reader.pread_into(entry, name, piece, start)
        crc = crc32c(piece, crc)
        bar.advance(len(piece))
    reader.check_crc(name, entry, crc)


def verify(prefix: str, show_progress: bool = True) -> dict:
    """Check every tensor of the checkpoint; return {"prefix", "tensors", "bytes", "seconds",
    "bad": [{"name", "file", "error"}]}."""
    started = time.perf_counter()
    bad = []
    try:
        reader = BundleReader(prefix)
    except GpusaverError as e:
        return {"prefix": prefix, "tensors": 0, "bytes": 0, "seconds": 0.0,
                "bad": [{"name": None, "file": naming.index_path(prefix), "error": str(e)}]}
    with reader:
        work = []  # (shard, offset, name, label, entry) of every stored piece
        names = reader.keys()
        for name in names:
            try:
                entry = reader.entry(name)
                if entry.slices:
                    work += [(p.shard_id, p.offset, name, label, p) for label, p in _slice_parts(reader, name, entry)]
                else:
                    work.append((entry.shard_id, entry.offset, name, name, entry))
            except (GpusaverError, KeyError, ValueError) as e:
                bad.append({"name": name, "file": reader.index_path, "error": str(e)})
        work.sort(key=lambda w: (w[0], w[1]))  # data-file order: sequential reads
        total = sum(w[4].size for w in work)
        buf = memoryview(bytearray(min(CHUNK, max((w[4].size for w in work), default=0))))
        failed = {b["name"] for b in bad}
        with progress(total, "verify", show_progress) as bar:
            for _, _, name, label, entry in work:
                if name in failed:
                    bar.advance(entry.size)
                    continue
                try:
                    _check_bytes(reader, label, entry, buf, bar)
                except (GpusaverError, ValueError, OSError) as e:
                    failed.add(name)
                    message = str(e) if isinstance(e, GpusaverError) else f"{reader.data_file(entry)}: {e}"
                    bad.append({"name": name, "file": reader.data_file(entry), "error": message})
    return {"prefix": prefix, "tensors": len(names), "bytes": total,
            "seconds": time.perf_counter() - started, "bad": bad}


def run_verify(args) -> int:
    prefix = resolve_prefix(args.path)
    result = verify(prefix, show_progress=not args.json)
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif result["bad"]:
        for b in result["bad"]:
            print(f"BAD {b['name'] if b['name'] is not None else '(index)'}: {b['error']}")
        print(f"FAILED: {len(result['bad'])} of {result['tensors']} tensors bad in {prefix}")
    else:
        rate = result["bytes"] / max(result["seconds"], 1e-9) / (1 << 30)
        print(f"OK: {result['tensors']} tensors, {human_bytes(result['bytes'])} verified in {prefix} "
              f"({result['seconds']:.2f} s, {rate:.2f} GiB/s)")
    return 1 if result["bad"] else 0


# --- diff ---------------------------------------------------------------------------------------
def _as_numbers(raw: np.ndarray, dtype: np.dtype) -> np.ndarray:
    values = raw.view(dtype)
    if dtype.kind not in "biufc":  # bfloat16 and other ml_dtypes compare as float32
        values = values.astype(np.float32)
    return values


def _compare_plain(ra, rb, name, ea, eb, bar) -> tuple[int, float | None]:
    """(elements that differ, max |a - b| or None) of two plain numeric tensors, piece by piece.
    NaN equals NaN here: a diff reports changes, not IEEE comparisons."""
    dtype = enum_to_dtype(ea.dtype)
    step = max(CHUNK // dtype.itemsize, 1) * dtype.itemsize
    buf_a, buf_b = np.empty(min(step, ea.size), np.uint8), np.empty(min(step, ea.size), np.uint8)
    differ, largest = 0, None
    for start in range(0, ea.size, step):
        n = min(step, ea.size - start)
        ra.pread_into(ea, name, memoryview(buf_a)[:n], start)
        rb.pread_into(eb, name, memoryview(buf_b)[:n], start)
        bar.advance(2 * n)
        a, b = _as_numbers(buf_a[:n], dtype), _as_numbers(buf_b[:n], dtype)
        neq = a != b
        if dtype.kind in "fc":
            neq &= ~(np.isnan(a) & np.isnan(b))
        count = int(np.count_nonzero(neq))
        if count and dtype.kind != "b":
            d = np.abs(a[neq].astype(np.complex128 if dtype.kind == "c" else np.float64)
                       - b[neq].astype(np.complex128 if dtype.kind == "c" else np.float64))
            m = float(np.nanmax(d)) if not np.all(np.isnan(d)) else float("nan")
            largest = m if largest is None else max(largest, m)
        differ += count
    return differ, largest


def diff(prefix_a: str, prefix_b: str, show_progress: bool = True) -> dict:
    """{"added", "removed", "changed": [{"name", "what", "a", "b"}], "same": count}."""
    with BundleReader(prefix_a) as ra, BundleReader(prefix_b) as rb:
        ka, kb = set(ra.keys()), set(rb.keys())
        added = sorted(kb - ka)
        removed = sorted(ka - kb)
        changed, same, to_compare = [], 0, []
        for name in sorted(ka & kb):
            ea, eb = ra.entry(name), rb.entry(name)
            if ea.dtype != eb.dtype:
                changed.append({"name": name, "what": "dtype", "a": dtype_name(ea.dtype), "b": dtype_name(eb.dtype)})
            elif tuple(ea.shape) != tuple(eb.shape):
                changed.append({"name": name, "what": "shape", "a": list(ea.shape), "b": list(eb.shape)})
            elif (not ea.slices and not eb.slices and ea.dtype != DataType.STRING and ea.crc32c and eb.crc32c
                  and ea.crc32c == eb.crc32c and ea.size == eb.size):
                same += 1  # the same checksum over the same number of bytes: the same values
            else:
                to_compare.append((name, ea, eb))
        total = sum(ea.size + eb.size for _, ea, eb in to_compare)
        with progress(total, "diff", show_progress) as bar:
            for name, ea, eb in to_compare:
                plain = not ea.slices and not eb.slices and ea.dtype != DataType.STRING and ea.size == eb.size
                if plain:
                    count, largest = _compare_plain(ra, rb, name, ea, eb, bar)
                else:  # strings and partitioned tensors: read whole
                    a, b = ra.read(name), rb.read(name)
                    bar.advance(ea.size + eb.size)
                    neq = a != b
                    if a.dtype.kind == "f":
                        neq &= ~(np.isnan(a) & np.isnan(b))
                    count, largest = int(np.count_nonzero(neq)), None
                if count:
                    item = {"name": name, "what": "values", "differ": count,
                            "elements": num_elements(ea.shape)}
                    if largest is not None:
                        item["max_abs_diff"] = largest
                    changed.append(item)
                else:
                    same += 1
    return {"a": prefix_a, "b": prefix_b, "added": added, "removed": removed,
            "changed": sorted(changed, key=lambda c: c["name"]), "same": same}


def run_diff(args) -> int:
    a, b = resolve_prefix(args.a), resolve_prefix(args.b)
    result = diff(a, b, show_progress=not args.json)
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for name in result["added"]:
            print(f"+ {name}")
        for name in result["removed"]:
            print(f"- {name}")
        for c in result["changed"]:
            if c["what"] == "values":
                extra = f", max |a-b| {c['max_abs_diff']:.6g}" if "max_abs_diff" in c else ""
                print(f"~ {c['name']}: values differ in {c['differ']} of {c['elements']} elements{extra}")
            else:
                shown = (lambda v: "[" + ",".join(map(str, v)) + "]") if c["what"] == "shape" else str
                print(f"~ {c['name']}: {c['what']} {shown(c['a'])} -> {shown(c['b'])}")
        print(f"{len(result['added'])} added, {len(result['removed'])} removed, {len(result['changed'])} changed, "
              f"{result['same']} unchanged")
    return 1 if result["added"] or result["removed"] or result["changed"] else 0


# --- latest -------------------------------------------------------------------------------------
def run_latest(args) -> int:
    if not for_url(args.dir).isdir(args.dir):
        raise CommandError(f"{args.dir!r} is not a directory")
    prefix = latest_checkpoint(args.dir)
    if prefix is None:
        state = read_state(args.dir)
        why = ("it has no 'checkpoint' state file" if state is None else
               f"its 'checkpoint' file names {state.model_checkpoint_path!r}, which has no .index")
        raise CommandError(f"no latest checkpoint in {args.dir!r}: {why}", status=1)
    print(prefix)
    return 0
