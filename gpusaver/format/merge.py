"""Merge several bundles into one: TensorFlow's ``MergeV2Checkpoints`` in gpusaver's own code.

Each worker of a multi-worker save writes its share of the tensors as a bundle of its own; the
merge moves their data files into the destination's numbering (a rename on a local disk, a
server-side copy on an object store) and writes one ``.index`` over all of them, its entries'
shard ids remapped. No tensor bytes pass through this process: only the indexes are read.

The result is byte for byte what TF's ``tf.raw_ops.MergeV2Checkpoints`` writes for the same inputs
(shard ids in input order, and within an input in the order its entries first use them; entries
sorted by key; the first input's version and endianness; slices of a partitioned tensor gathered
into one entry). One difference: a data shard no entry lives in is moved too (TF leaves it).
"""
import dataclasses
import os

from gpusaver.errors import CorruptCheckpointError, MismatchError
from gpusaver.format import naming
from gpusaver.format.bundle import MAX_SHARDS
from gpusaver.format.proto import Entry
from gpusaver.format.reader import BundleReader
from gpusaver.format.table import TableBuilder
from gpusaver.storage import LocalStorage, Storage, for_url


def merge(prefixes: list[str], destination: str, *, delete_old: bool = True, fsync: bool = False,
          storage: Storage | None = None) -> str:
    """Merge the bundles at ``prefixes`` (in that order) into one at ``destination``; return it.

    The data files are moved, not read: renamed on a local disk (the inputs and the destination
    must be on one file system), copied and deleted by the server on an object store (S3's
    CopyObject, GCS's rewrite). The merged index is written last, so the destination exists only
    once it is complete; if a move fails, the data moved so far is moved back (best effort) and no
    index appears. With ``delete_old`` the inputs' index files are removed afterwards (their data
    files are now the destination's). ``storage``: where all of them live (default
    ``for_url(destination)``; pass ``for_url(destination, options)`` for a store that needs
    ``Options.storage_options``).

    Raises CheckpointNotFoundError for a missing input, MismatchError for a tensor that two inputs
    both hold (unless both hold slices of it, of one dtype and shape), CorruptCheckpointError for
    inputs that disagree in endianness or exceed MAX_SHARDS in all, CheckpointIOError naming the
    file or object when a move or the index write fails.
    """
    if not prefixes:
        raise ValueError("merge needs at least one input prefix")
    destination = os.fspath(destination)
    store = storage if storage is not None else for_url(destination)
    readers = []
    try:
        for p in prefixes:
            readers.append(BundleReader(p, storage=store))
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
    store.makedirs(store.dirname(destination))
    # The index is written (under a temporary name, or as an upload not yet completed) before any
    # data file moves, so a full disk or a refused upload fails the merge while the inputs are whole.
    stream = store.open_write(index, fsync, "writing the merged checkpoint index")
    moved: list[tuple[str, str]] = []
    try:
        stream.write(table.finish())
        stream.close()
        for new_id, (prefix, shard, num_shards) in enumerate(renames):
            src = naming.data_path(prefix, shard, num_shards)
            dst = naming.data_path(destination, new_id, total)
            if not _same(store, src, dst):
                store.move(src, dst)
                moved.append((src, dst))
        stream.commit()  # last: the merged checkpoint exists from here on
    except BaseException:
        stream.discard()
        for src, dst in reversed(moved):  # give the inputs their data back
            try:
                store.move(dst, src)
            except OSError:
                pass
        raise
    if delete_old:
        for prefix in prefixes:
            if not _same(store, naming.index_path(prefix), index):
                try:
                    store.delete(naming.index_path(prefix))
                except OSError:
                    pass  # best effort, as TF: the merged checkpoint is complete
    return destination


def _same(store: Storage, a: str, b: str) -> bool:
    if isinstance(store, LocalStorage):
        return os.path.abspath(a) == os.path.abspath(b)
    return a == b


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
            entry = entry._replace(shard_id=ids[entry.shard_id])
            seen = entries.get(key)
            if seen is None:
                entries[key], owner[key] = entry, reader.prefix
            elif seen.slices and entry.slices and (seen.dtype, seen.shape) == (entry.dtype, entry.shape):
                entries[key] = seen._replace(slices=seen.slices + entry.slices)
            else:
                name = key.decode("utf-8", "replace")
                raise MismatchError(f"tensor {name!r} is in both {owner[key]!r} and {reader.prefix!r}: "
                                    "each tensor must be saved by exactly one of the merged checkpoints")
        renames += [(reader.prefix, i, reader.num_shards) for i in range(reader.num_shards) if i not in ids]
    return entries, renames
