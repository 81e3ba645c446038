"""What the CPU benches (with and without TensorFlow) share: clean starts and the disk's raw limits.

TensorFlow-free, so the peers bench (:mod:`gpusaver.bench.peers`) runs where TF is not installed.
"""
import ctypes
import os
import queue
import re
import shutil
import threading
import time

import numpy as np

from gpusaver.bench import MiB, Case, timed
from gpusaver.format.wire import crc32c

_LIMIT_BUFFER = 256 * MiB  # limits cycle through one buffer pair: same bytes moved, bounded memory
_WRITE_PIECE = 64 * MiB  # "large writes" for the plain-write limit


def fresh(directory: str):
    """Remove a contender's previous output and flush dirty pages, so each save starts alike."""
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    os.sync()


def warm_free_memory(nbytes: int):
    """Give every contender the same start for its memory, just before a timed operation.

    First the process's allocator hands its free memory back (glibc ``malloc_trim``): what an
    earlier contender freed stays faulted in the heap, and a contender that ``malloc``s its arrays
    would reuse it (no page faults) where one whose memory comes from fresh mappings (gpusaver's
    load slabs, large arrays) pays them: measured on the peers bench's 30,000 × 8 KiB load,
    safetensors took 0.42 s after torch.load's runs had warmed the heap, 0.62 s after a trim, as in
    a fresh process. Then ``nbytes`` (at most half the free memory) are touched and freed: on VMs
    with free page reporting (virtio-balloon), memory left free for ~2 s goes back to the host and
    the next touch of it costs ~10x (seen on the 2-core bench VM: 2 GiB faulted in 0.28 s warm,
    2.5 s after 5 s idle); page-cache writes and fresh restore buffers would pay that at random.
    """
    _malloc_trim()
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    np.ones(min(nbytes, free // 2), dtype=np.uint8)  # dropped at once: the pages return warm


def _malloc_trim():
    """glibc's ``malloc_trim(0)``, where the C library has it (not musl, not macOS)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def fsync_tree(directory: str):
    """fsync every file in ``directory`` and the directory itself (what gpusaver's fsync=True does)."""
    for entry in os.scandir(directory):
        with open(entry.path, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


# --- raw limits --------------------------------------------------------------------------------
def limit_cases(nbytes: int, path: str, setup, read_setup) -> list[Case]:
    """Plain write of ``nbytes`` to ``path`` (large writes, one file), the same write with every
    piece's CRC32C computed just ahead of it on a second thread (what a checkpointer that
    checksums its bytes needs at least), write + fsync, memcpy, read-back.

    ``setup`` gives the writes (and the memcpy) the same start as the saves, ``read_setup`` the
    read-back the same start as the restores.
    """
    src = np.full(_LIMIT_BUFFER, 7, dtype=np.uint8)
    dst = np.zeros(_LIMIT_BUFFER, dtype=np.uint8)  # touched, so the memcpy pays no page faults

    def pieces():
        done = 0
        while done < nbytes:
            offset = done % _LIMIT_BUFFER
            n = min(_WRITE_PIECE, nbytes - done, _LIMIT_BUFFER - offset)
            yield offset, n
            done += n

    def write(fsync=False):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb", buffering=0) as f:
            for offset, n in pieces():
                f.write(memoryview(src)[offset:offset + n])
            if fsync:
                os.fsync(f.fileno())

    def write_checksummed():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ahead: queue.Queue = queue.Queue(2)  # the checksums run two pieces ahead of the writes

        def checksum():
            for offset, n in pieces():
                view = memoryview(src)[offset:offset + n]
                crc32c(view)  # the GIL released, as for a save's large pieces
                ahead.put(view)
            ahead.put(None)
        thread = threading.Thread(target=checksum, name="limit-crc32c")
        thread.start()
        view = b""
        try:
            with open(path, "wb", buffering=0) as f:
                while (view := ahead.get()) is not None:
                    f.write(view)
        finally:
            while view is not None:  # a failed write: let the checksum thread finish
                view = ahead.get()
            thread.join()

    def memcpy():
        for offset, n in pieces():
            np.copyto(dst[offset:offset + n], src[offset:offset + n])

    def read():
        with open(path, "rb", buffering=0) as f:
            for offset, n in pieces():
                f.readinto(memoryview(dst)[offset:offset + n])

    return [Case("limit: write", "save", lambda: timed(write), setup),
            Case("limit: write + CRC32C", "save", lambda: timed(write_checksummed), setup),
            Case("limit: memcpy", "save", lambda: timed(memcpy), setup),
            Case("limit: write + fsync", "fsync", lambda: timed(lambda: write(True)), setup),
            Case("limit: read", "restore", lambda: timed(read), read_setup)]


def fresh_folder(parent: str = ".", stem: str = "gpusaver-bench") -> str:
    """A new folder ``parent/stem-YYYYmmdd-HHMMSS[-N]``: a run never overwrites an earlier one's
    results. Raises FileExistsError when a thousand such names are taken."""
    base = os.path.join(parent, f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    for n in range(1, 1000):
        path = base if n == 1 else f"{base}-{n}"
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot make a fresh folder next to {base!r}")
