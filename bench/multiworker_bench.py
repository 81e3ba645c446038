#!/usr/bin/env python3
"""Multi-worker save time: the same model saved by 1, 2 and 3 MultiWorkerMirroredStrategy workers.

Each cluster is real worker processes on localhost (TF_CONFIG with 127.0.0.1 ports). Every worker
times ``gpusaver.Saver.save`` (each writes its share, the chief merges and commits) and, beside it
in the same cluster, TF's way (``tf.train.Checkpoint.write``: every worker writes the whole model,
the chief to the real path and the others to temporary ones, as TF's guide does). The chief's
medians are reported. All workers share this machine's cores and disk, so the figures show what
splitting the bytes buys on one machine, not on a cluster of machines. Usage::

    python bench/multiworker_bench.py --workers 1,2,3 --size-mib 256 --runs 5
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(task: int, ports: list[str], directory: str, size_mib: int, runs: int):
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                          "task": {"type": "worker", "index": task}})
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, ROOT)
    import gpusaver

    strategy = tf.distribute.MultiWorkerMirroredStrategy() if len(ports) > 1 else tf.distribute.get_strategy()
    rng = np.random.default_rng(0)
    large = size_mib * (1 << 20) * 9 // 10 // 16 // 4  # 90% in 16 large tensors, the rest in 500 small
    small = size_mib * (1 << 20) // 10 // 500 // 4
    with strategy.scope():
        variables = {f"large_{i:02d}": tf.Variable(rng.random(large, dtype=np.float32)) for i in range(16)}
        variables.update({f"small_{i:03d}": tf.Variable(rng.random(small, dtype=np.float32)) for i in range(500)})
    saver = gpusaver.Saver(variables, max_to_keep=None)
    checkpoint = tf.train.Checkpoint(**variables)
    times = {"gpusaver Saver.save": [], "tf.train.Checkpoint.write": []}
    for run in range(runs + 1):  # the first is a warm-up
        started = time.perf_counter()
        saver.save(os.path.join(directory, "gs"), global_step=run)
        times["gpusaver Saver.save"].append(time.perf_counter() - started)
        started = time.perf_counter()
        checkpoint.write(os.path.join(directory, f"tf-{run}" if task == 0 else f"tf_temp_{task}-{run}"))
        times["tf.train.Checkpoint.write"].append(time.perf_counter() - started)
    if task == 0:
        print("RESULT " + json.dumps({k: statistics.median(v[1:]) for k, v in times.items()}), flush=True)


def _free_ports(n: int) -> list[str]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [str(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    return ports


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,3")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--worker", nargs=3, metavar=("TASK", "PORTS", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        task, ports, directory = args.worker
        worker(int(task), ports.split(","), directory, args.size_mib, args.runs)
        return 0
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    print(f"{args.size_mib} MiB model (16 large + 500 small float32 tensors), medians of {args.runs} "
          f"after a warm-up, chief's clock; {os.cpu_count()} cores")
    for n in map(int, args.workers.split(",")):
        directory = tempfile.mkdtemp(prefix=f"gpusaver-mw{n}-")
        ports = ",".join(_free_ports(n))
        procs = [subprocess.Popen([sys.executable, __file__, "--size-mib", str(args.size_mib), "--runs",
                                   str(args.runs), "--worker", str(i), ports, directory],
                                  stdout=subprocess.PIPE, text=True, env=env) for i in range(n)]
        result = next((json.loads(line[7:]) for line in procs[0].stdout if line.startswith("RESULT ")), None)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(directory, ignore_errors=True)
        if result is None:
            print(f"{n} worker(s): failed (no result from the chief)")
            return 1
        print(f"{n} worker(s): " + ", ".join(f"{k} {v:.3f} s" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
