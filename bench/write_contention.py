#!/usr/bin/env python3
"""Does a plain write slow down while the machine's other cores work? (No gpusaver code runs.)

A save writes on one thread while others checksum, describe tensors and run the framework's reads.
On a machine with few cores those share the CPU, the caches and the memory bus with the kernel's
page-cache copy. This times the plain write of ``--gib`` GiB (64 MiB writes, page cache; wall and
the writing thread's CPU time) alone and beside one other process that keeps a core busy: with
Python (dicts and small objects, as per-tensor code does), with memcpy, or with CRC32C over memory;
and, as a control, a pure-Python loop alone and beside the Python load. Rounds alternate the order.
Usage::

    python bench/write_contention.py --gib 1 --rounds 9
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpusaver.bench.disk import fresh, warm_free_memory  # noqa: E402

_LOAD = r"""
import sys, time
import numpy as np
kind, seconds = sys.argv[1], float(sys.argv[2])
end = time.time() + seconds
if kind == "python":
    while time.time() < end:
        d = {}
        for i in range(10000):
            d[str(i)] = (i, [i])
elif kind == "memcpy":
    a = np.ones(256 << 20, np.uint8)
    b = np.empty_like(a)
    while time.time() < end:
        np.copyto(b, a)
elif kind == "crc32c":
    import crc32c
    a = np.ones(256 << 20, np.uint8)
    while time.time() < end:
        crc32c.crc32c(a)
"""


def python_loop():
    x = 0
    for i in range(3_000_000):
        x += i * i
    return x


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    nbytes = int(args.gib * (1 << 30))
    data = np.full(nbytes, 7, np.uint8)
    scratch = tempfile.mkdtemp(prefix="write-contention-", dir=args.dir)

    def write():
        fd = os.open(os.path.join(scratch, "plain"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            for start in range(0, nbytes, 64 << 20):
                os.write(fd, data[start:start + (64 << 20)])
        finally:
            os.close(fd)

    cases = [("write", None, write), ("write", "python", write), ("write", "memcpy", write),
             ("write", "crc32c", write), ("python loop", None, python_loop), ("python loop", "python", python_loop)]
    results: dict[tuple, list] = {}
    for r in range(args.rounds):
        for what, load, call in (cases if r % 2 else cases[::-1]):
            fresh(scratch)
            warm_free_memory(2 * nbytes)
            other = None
            if load:
                other = subprocess.Popen([sys.executable, "-c", _LOAD, load, "30"])
                time.sleep(0.8)  # started and busy
                if other.poll() is not None:
                    raise RuntimeError(f"the {load} load exited at once (status {other.returncode})")
            try:
                wall, cpu = time.perf_counter(), time.thread_time()
                call()
                results.setdefault((what, load), []).append((time.perf_counter() - wall, time.thread_time() - cpu))
            finally:
                if other:
                    other.kill()
                    other.wait()
    print(f"{os.cpu_count()} CPUs; {args.gib:g} GiB written in 64 MiB writes (page cache); medians of {args.rounds}")
    for (what, load), runs in results.items():
        wall, cpu = np.median([w for w, _ in runs]), np.median([c for _, c in runs])
        print(f"  {what:12s} {'beside a ' + load + ' load' if load else 'alone':24s} wall {wall:.3f} s   "
              f"its thread's CPU {cpu:.3f} s")
    fresh(scratch)
    os.rmdir(scratch)


if __name__ == "__main__":
    main()
