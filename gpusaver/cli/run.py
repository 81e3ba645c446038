"""``gpusaver bench`` and ``gpusaver demo``: the commands that run TensorFlow (and CuPy)."""
import os
import shlex
import shutil
import sys
import tempfile

from gpusaver.cli._common import CommandError, import_tensorflow, quiet_native_stderr


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# --- bench --------------------------------------------------------------------------------------
def _workloads(args):
    from gpusaver.bench import WORKLOADS, GiB, MiB, Workload
    kinds, dtypes = _list(args.workloads), _list(args.dtypes)
    for bad in set(kinds) - set(WORKLOADS):
        raise SystemExit(f"gpusaver bench: unknown workload {bad!r} (known: {', '.join(WORKLOADS)})")
    for bad in set(dtypes) - {"float32", "bfloat16"}:
        raise SystemExit(f"gpusaver bench: unknown dtype {bad!r} (known: float32, bfloat16)")
    # --tiny: the same structure at 4 MiB, so a smoke test runs every code path in seconds
    sizes = [4 * MiB] if args.tiny else [int(float(s) * GiB) for s in _list(args.sizes)]
    return [Workload(k, size, d, tiny=args.tiny) for size in sizes for k in kinds for d in dtypes]


def fresh_folder(parent: str = ".", stem: str = "gpusaver-bench") -> str:
    """A new folder ``parent/stem-YYYYmmdd-HHMMSS[-N]``: a run never overwrites an earlier one's results."""
    from gpusaver.bench.disk import fresh_folder as make
    try:
        return make(parent, stem)
    except FileExistsError as e:
        raise CommandError(str(e)) from None


def failures(cpu_records: list[dict], gpu_record: dict | None) -> list[str]:
    """What makes a bench run fail: a restore that gave wrong values, or a measurement (a peak-memory
    child process) that did not run. MISSes against the targets are results, not failures."""
    bad = [f"{r['label']}: {n} restored wrong values" for r in cpu_records
           for n, ok in r.get("restore_correct", {}).items() if not ok]
    bad += [f"{w['label']}: load restored wrong values" for w in (gpu_record or {}).get("workloads", [])
            if not w.get("load_correct", True)]
    bad += [f"{r['label']}: peak-memory child for {n!r} failed: {m['error']}" for r in cpu_records
            for n, m in r.get("memory", {}).items() if "error" in m]
    return bad


def bench(args) -> int:
    """Run the benches; return 1 if a restore gave wrong values or a measurement failed, else 0."""
    from gpusaver.bench import report
    workloads = _workloads(args)
    runs = args.runs if args.runs is not None else (1 if args.tiny else 5)
    warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 1)
    out = args.out or fresh_folder()
    scratch = args.scratch or os.path.join(out, "scratch.tmp")
    gpu_record, cpu_records, peer_records = None, [], []
    if args.peers:  # TF-free: never imports TensorFlow
        from gpusaver.bench.peers import bench_peers
        peer_records = [bench_peers(w, runs, warmup, os.path.join(scratch, "peers"), args.baseline) for w in workloads]
    elif args.gpu:  # before TensorFlow is imported, so TF cannot reserve the GPU's memory first
        from gpusaver.bench.gpu import bench_gpu
        try:
            gpu_record = bench_gpu(workloads, runs, warmup, os.path.join(scratch, "gpu"))
        except (ImportError, RuntimeError) as e:  # no CuPy or no GPU: say so, no traceback
            print(f"gpusaver bench --gpu: {e}", file=sys.stderr)
            return 2
    if not args.peers and (args.cpu or not args.gpu):
        import_tensorflow()
        from gpusaver.bench.cpu import bench_workload
        for w in workloads:
            cpu_records.append(bench_workload(w, runs, warmup, os.path.join(scratch, "cpu"),
                                              memory=not args.no_memory))
    if not args.scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    command = "gpusaver bench " + " ".join(shlex.quote(a) for a in args.argv)
    config = {"workloads": [w.label for w in workloads], "runs": runs, "warmup": warmup, "tiny": args.tiny}
    result = report.assemble(cpu_records, gpu_record, out, command, config, peers=peer_records)
    paths = report.write_all(result, out)
    print(report.markdown(result))
    print("wrote " + ", ".join(paths.values()))
    bad = failures(cpu_records, gpu_record) + [f"{r['label']}: {n} loaded wrong values" for r in peer_records
                                               for n, ok in r["load_correct"].items() if not ok]
    for line in bad:
        print(f"ERROR: {line}", file=sys.stderr)
    return 1 if bad else 0


# --- demo ---------------------------------------------------------------------------------------
def demo(args) -> int:
    """Save a small trained Keras model, perturb it, restore it and check every value: by name
    (``gpusaver.Saver``), then model + optimizer as objects (``gpusaver.Checkpoint`` through
    ``gpusaver.CheckpointManager``), the latter also restored by TensorFlow's own
    ``tf.train.Checkpoint``. Returns 1 if any value differs, else 0."""
    if args.dir is None:
        with tempfile.TemporaryDirectory(prefix="gpusaver-demo-") as directory:
            status = _demo(directory)
            print("(the files were in a temporary directory, now removed; `gpusaver demo DIR` keeps them)")
            return status
    return _demo(args.dir)


def _perturb(variables):
    import numpy as np
    for v in variables:  # so that a restore that does nothing cannot pass
        v.assign(np.full(v.shape, 42, dtype=v.dtype))


def _demo(directory: str) -> int:
    import numpy as np
    tf = import_tensorflow()
    with quiet_native_stderr():
        import keras
    import gpusaver

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    x, y = np.random.rand(64, 8).astype("float32"), np.random.rand(64, 1).astype("float32")
    model.train_on_batch(x, y)  # one training step: the weights exist and are no longer initial values

    saver = gpusaver.Saver(model.weights)  # Keras 3 variables are named by their .path
    prefix = saver.save(os.path.join(directory, "model"), global_step=1)
    saved = {v.path: np.array(v.numpy()) for v in model.weights}
    print(f"saved {len(saved)} variables to {prefix}:")
    for name in sorted(os.listdir(directory)):
        print(f"  {os.path.join(directory, name)}  {os.path.getsize(os.path.join(directory, name))} bytes")

    _perturb(model.weights)
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
    return _demo_objects(tf, gpusaver, model, os.path.join(directory, "ckpts"))


def _demo_objects(tf, gpusaver, model, directory: str) -> int:
    """The object-based path: model and optimizer through gpusaver.Checkpoint and
    gpusaver.CheckpointManager (tf.train.Checkpoint's format: TF's own restore matches every object)."""
    import numpy as np
    variables = model.weights + model.optimizer.variables  # Adam's step count and slots too
    saved = [np.array(v.numpy()) for v in variables]
    checkpoint = gpusaver.Checkpoint(model=model, optimizer=model.optimizer)
    manager = gpusaver.CheckpointManager(checkpoint, directory, max_to_keep=3)
    prefix = manager.save_async().result()  # save_async returns once the snapshot is held
    print(f"gpusaver.Checkpoint(model=model, optimizer=optimizer) saved {len(saved)} variables through "
          f"gpusaver.CheckpointManager to {prefix} (latest_checkpoint: {manager.latest_checkpoint})")

    wrong = []
    for who, restore in [("gpusaver.Checkpoint", checkpoint.restore),
                         ("tf.train.Checkpoint", tf.train.Checkpoint(model=model, optimizer=model.optimizer).restore)]:
        _perturb(variables)
        restore(manager.latest_checkpoint).assert_consumed()  # every object matched, every value used
        wrong += [f"{v.path} ({who})" for v, s in zip(variables, saved) if not np.array_equal(v.numpy(), s)]
    if wrong:
        print(f"MISMATCH: {len(wrong)} variables differ after restore: {', '.join(wrong)}", file=sys.stderr)
        return 1
    print(f"OK: model and optimizer ({len(saved)} variables) restored by gpusaver.Checkpoint and by "
          "tf.train.Checkpoint (assert_consumed) match")
    return 0
