"""The ``gpusaver`` command: ``gpusaver demo [DIR]`` and ``gpusaver bench [options]``.

``demo`` saves a small Keras model, restores it and checks the values (and that TensorFlow itself
reads the checkpoint); ``bench`` runs the benchmarks of :mod:`gpusaver.bench` and writes
results.json / results.md / results.png. TensorFlow and CuPy are imported only by the command that
needs them.
"""
import argparse
import os
import shlex
import shutil
import sys


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# --- bench --------------------------------------------------------------------------------------
def _workloads(args):
    from gpusaver.bench import GiB, MiB, Workload
    kinds, dtypes = _list(args.workloads), _list(args.dtypes)
    for bad in set(kinds) - {"mix", "small"}:
        raise SystemExit(f"gpusaver bench: unknown workload {bad!r} (known: mix, small)")
    for bad in set(dtypes) - {"float32", "bfloat16"}:
        raise SystemExit(f"gpusaver bench: unknown dtype {bad!r} (known: float32, bfloat16)")
    # --tiny: the same structure at 4 MiB, so a smoke test runs every code path in seconds
    sizes = [4 * MiB] if args.tiny else [int(float(s) * GiB) for s in _list(args.sizes)]
    return [Workload(k, size, d, tiny=args.tiny) for size in sizes for k in kinds for d in dtypes]


def bench(args) -> int:
    """Run the benches; return 1 if a restore gave wrong values, else 0 (MISSes are results, not errors)."""
    from gpusaver.bench import report
    workloads = _workloads(args)
    runs = args.runs if args.runs is not None else (1 if args.tiny else 5)
    warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 1)
    # "*.tmp" under bench/results is git-ignored, so an interrupted run leaves no checkpoint to commit
    scratch = args.scratch or os.path.join(args.out, "scratch.tmp")
    gpu_record, cpu_records = None, []
    if args.gpu:  # before TensorFlow is imported, so TF cannot reserve the GPU's memory first
        from gpusaver.bench.gpu import bench_gpu
        try:
            gpu_record = bench_gpu(workloads, runs, warmup, os.path.join(scratch, "gpu"))
        except (ImportError, RuntimeError) as e:  # no CuPy or no GPU: say so, no traceback
            print(f"gpusaver bench --gpu: {e}", file=sys.stderr)
            return 2
    if args.cpu or not args.gpu:
        from gpusaver.bench.cpu import bench_workload
        for w in workloads:
            cpu_records.append(bench_workload(w, runs, warmup, os.path.join(scratch, "cpu"),
                                              memory=not args.no_memory))
    if not args.scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    command = "gpusaver bench " + " ".join(shlex.quote(a) for a in args.argv)
    config = {"workloads": [w.label for w in workloads], "runs": runs, "warmup": warmup, "tiny": args.tiny}
    result = report.assemble(cpu_records, gpu_record, args.out, command, config)
    paths = report.write_all(result, args.out)
    print(report.markdown(result))
    print("wrote " + ", ".join(paths.values()))
    bad = [n for r in cpu_records for n, ok in r["restore_correct"].items() if not ok]
    bad += [w["label"] for w in (gpu_record or {}).get("workloads", []) if not w["load_correct"]]
    if bad:
        print("ERROR: restored values differ for: " + ", ".join(bad), file=sys.stderr)
    return 1 if bad else 0


# --- demo ---------------------------------------------------------------------------------------
def demo(args) -> int:
    """Save a small trained Keras model, perturb it, restore it and check every value."""
    import numpy as np
    import keras
    import tensorflow as tf
    import gpusaver

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    x, y = np.random.rand(64, 8).astype("float32"), np.random.rand(64, 1).astype("float32")
    model.train_on_batch(x, y)  # one training step: the weights exist and are no longer initial values

    saver = gpusaver.Saver(model.weights)  # Keras 3 variables are named by their .path
    prefix = saver.save(os.path.join(args.dir, "model"), global_step=1)
    saved = {v.path: np.array(v.numpy()) for v in model.weights}
    print(f"saved {len(saved)} variables to {prefix}:")
    for name in sorted(os.listdir(args.dir)):
        print(f"  {os.path.join(args.dir, name)}  {os.path.getsize(os.path.join(args.dir, name))} bytes")

    for v in model.weights:  # perturb, so a restore that does nothing cannot pass
        v.assign(np.full(v.shape, 42.0, dtype=v.dtype))
    saver.restore(prefix)
    wrong = [v.path for v in model.weights if not np.array_equal(v.numpy(), saved[v.path])]

    # TensorFlow's own reader opens the same files: the checkpoint is TF's V2 format.
    name = model.weights[0].path
    tf_value = tf.train.load_checkpoint(prefix).get_tensor(name)
    print(f"tf.train.load_checkpoint reads {name!r}: shape {tf_value.shape}, "
          f"equal to the saved value: {np.array_equal(tf_value, saved[name])}")
    if not np.array_equal(tf_value, saved[name]):
        wrong.append(f"{name} (as read by TensorFlow)")
    if wrong:
        print(f"MISMATCH: {len(wrong)} variables differ after restore: {', '.join(wrong)}", file=sys.stderr)
        return 1
    print(f"OK: restored {len(saved)} variables match")
    return 0


# --- main ---------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpusaver", description="GPU-aware TensorFlow checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="save, restore and verify a small Keras model")
    d.add_argument("dir", nargs="?", default="./gpusaver-demo", help="where to write (default ./gpusaver-demo)")
    d.set_defaults(func=demo)

    b = sub.add_parser("bench", help="benchmark gpusaver against TensorFlow's savers",
                       description="Contenders are interleaved; 1 warm-up and --runs counted runs each; "
                                   "medians and min-max are reported with PASS/MISS against the targets.")
    b.add_argument("--sizes", default="1", help="model sizes in GiB, comma-separated, e.g. 0.25,1,4 (default 1)")
    b.add_argument("--workloads", default="mix,small",
                   help="mix (16 large + 2000 small tensors) and/or small (10,000 equal tensors); default both")
    b.add_argument("--dtypes", default="float32", help="float32 and/or bfloat16 (default float32)")
    b.add_argument("--runs", type=int, default=None, help="counted runs per contender (default 5; 1 with --tiny)")
    b.add_argument("--warmup", type=int, default=None, help="uncounted runs first (default 1; 0 with --tiny)")
    b.add_argument("--out", default=os.path.join("bench", "results"), help="output directory (default bench/results)")
    b.add_argument("--scratch", default=None, help="where checkpoints are written (default OUT/scratch.tmp, removed after)")
    b.add_argument("--tiny", action="store_true", help="4 MiB, few tensors, 1 run: a smoke test in seconds")
    b.add_argument("--gpu", action="store_true", help="GPU mode: CuPy arrays against raw pinned copies (needs CuPy)")
    b.add_argument("--cpu", action="store_true", help="with --gpu: run the CPU bench as well")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    b.set_defaults(func=bench)
    return p


def main(argv=None) -> int:
    """Run the ``gpusaver`` command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.argv = argv[1:]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
