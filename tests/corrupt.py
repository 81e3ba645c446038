"""Damaging a checkpoint's bytes on purpose, for the tests of what readers and restores do then."""
from gpusaver.format import BundleReader, naming

GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"  # tf.train.Checkpoint's object graph


def flip_byte(prefix: str, pick=None, at: int = 0) -> str:
    """Flip every bit of byte ``at`` (negative: from the end) of one tensor of the one-shard
    checkpoint at ``prefix``: the tensor ``pick(reader, keys)`` names among its tensors (the object
    graph left out), by default the one that lies last in the data file. Returns its name."""
    with BundleReader(prefix) as reader:
        keys = [k for k in reader.keys() if k != GRAPH_KEY]
        name = pick(reader, keys) if pick else max(keys, key=lambda k: reader.entry(k).offset)
        entry = reader.entry(name)
    with open(naming.data_path(prefix, 0, 1), "r+b") as f:
        f.seek(entry.offset + (at if at >= 0 else entry.size + at))
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    return name
