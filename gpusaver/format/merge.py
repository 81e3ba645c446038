"""Merge several bundles into one: TensorFlow's ``MergeV2Checkpoints`` in gpusaver's own code.

Each worker of a multi-worker save writes its share of the tensors as a bundle of its own; the
merge renames their data files into the destination's numbering and writes one ``.index`` over
all of them, its entries' shard ids remapped. Nothing is copied: only the indexes are read.

The result is byte for byte what TF's ``tf.raw_ops.MergeV2Checkpoints`` writes for the same inputs
(shard ids in input order, and within an input in the order its entries first use them; entries
sorted by key; the first input's version and endianness; slices of a partitioned tensor gathered
into one entry). One difference: a data shard no entry lives in is renamed too (TF leaves it).
"""
import dataclasses
import os

from gpusaver.errors import CorruptCheckpointError, MismatchError, io_error
from gpusaver.format import naming
from gpusaver.format.bundle import MAX_SHARDS
from gpusaver.format.proto import Entry
from gpusaver.format.reader import BundleReader
from gpusaver.format.table import TableBuilder
from gpusaver.storage import LocalStorage


def merge(prefixes: list[str], destination: str, *, delete_old: bool = True, fsync: bool = False) -> str:
    """Merge the bundles at ``prefixes`` (in that order) into one at ``destination``; return it.

    The data files are renamed (the inputs and the destination must be on one file system); the
    merged index is written last, so the destination exists only once it is complete. With
    ``delete_old`` the inputs' index files are removed afterwards (their data files are now the
    destination's). Raises CheckpointNotFoundError for a missing input, MismatchError for a
    tensor that two inputs both hold (unless both hold slices of it, of one dtype and shape),
    CorruptCheckpointError for inputs that disagree in endianness or exceed MAX_SHARDS in all,
    CheckpointIOError naming the file when a rename or the index write fails.
    """
    if not prefixes:
        raise ValueError("merge needs at least one input prefix")
    readers = [BundleReader(p) for p in prefixes]
    try:
        entries, renames = _merged_entries(readers)
        header = readers[0].header
    finally:
        for r in readers:
            r.close()
    total = len(renames)
    if total > MAX_SHARDS:
        raise CorruptCheckpointError(f"merging {len(prefixes)} checkpoints gives {total} shards; "
                                     f"the format allows {MAX_SHARDS}")
    table = TableBuilder()
    table.add(b"", dataclasses.replace(header, num_shards=total).encode())
    for key in sorted(entries):
        table.add(key, entries[key].encode())
    index = naming.index_path(destination)
    store = LocalStorage()  # the data files move by rename: inputs and destination are local
    store.makedirs(os.path.dirname(os.fspath(destination)))
    # The index is written (under a temporary name) before any data file moves, so a full disk
    # fails the merge while the inputs are still whole.
    stream = store.open_write(index, fsync, "writing the merged checkpoint index")
    try:
        stream.write(table.finish())
        stream.close()
        for new_id, (prefix, shard, num_shards) in enumerate(renames):
            src = naming.data_path(prefix, shard, num_shards)
            dst = naming.data_path(destination, new_id, total)
            if os.path.abspath(src) != os.path.abspath(dst):
                _rename(src, dst)
        stream.commit()  # last: the merged checkpoint exists from here on
    except BaseException:
        stream.discard()
        raise
    if delete_old:
        for prefix in prefixes:
            if os.path.abspath(naming.index_path(prefix)) != os.path.abspath(index):
                try:
                    os.remove(naming.index_path(prefix))
                except OSError:
                    pass  # best effort, as TF: the merged checkpoint is complete
    return destination


def _merged_entries(readers: list[BundleReader]):
    """({key: entry with its merged shard id}, [(prefix, shard, num_shards)] in merged shard order)."""
    first = readers[0]
    entries: dict[bytes, Entry] = {}
    owner: dict[bytes, str] = {}  # the input each entry came from, for the error message
    renames = []
    for reader in readers:
        if reader.header.endianness != first.header.endianness:
            raise CorruptCheckpointError(f"{reader.index_path}: endianness differs from {first.index_path}")
        # As TF: a shard's new id is given when the first entry (in key order) that lives in it
        # is met; shards no entry lives in (an empty shard) follow this input's others.
        ids: dict[int, int] = {}
        for key in reader.raw_keys():
            entry = reader.entry_at(key)
            if entry.shard_id not in ids:
                ids[entry.shard_id] = len(renames)
                renames.append((reader.prefix, entry.shard_id, reader.num_shards))
            entry = dataclasses.replace(entry, shard_id=ids[entry.shard_id])
            seen = entries.get(key)
            if seen is None:
                entries[key], owner[key] = entry, reader.prefix
            elif seen.slices and entry.slices and (seen.dtype, seen.shape) == (entry.dtype, entry.shape):
                entries[key] = dataclasses.replace(seen, slices=seen.slices + entry.slices)
            else:
                name = key.decode("utf-8", "replace")
                raise MismatchError(f"tensor {name!r} is in both {owner[key]!r} and {reader.prefix!r}: "
                                    "each tensor must be saved by exactly one of the merged checkpoints")
        renames += [(reader.prefix, i, reader.num_shards) for i in range(reader.num_shards) if i not in ids]
    return entries, renames


def _rename(src: str, dst: str):
    try:
        os.replace(src, dst)
    except OSError as e:
        raise io_error(e, src, f"renaming into the merged checkpoint as {dst!r}") from e
