#!/usr/bin/env python3
"""Object-based saves: ``gpusaver.Checkpoint.save_async`` against ``tf.train.Checkpoint.save``, with
and without TF's own async checkpointing, on one model + Adam state, interleaved, medians.

For each contender: the stall (until ``save``/``save_async`` returns and training could go on) and
the end-to-end time (until the files are complete: ``result()`` or ``sync()``). The model is the
bench's "mix" (16 large + 2000 small float32 tensors) with Adam's two slots per variable, so the
checkpoint holds three times the model's bytes. Usage::

    python bench/checkpoint_bench.py --size-gib 1 --runs 5     # 1 GiB in all (model + Adam state)
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gpusaver  # noqa: E402
from gpusaver.bench import GiB, Workload  # noqa: E402
from gpusaver.bench.cpu import build_variables  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="checkpoint size: model + Adam's slots")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    import keras
    import tensorflow as tf

    variables = list(build_variables(Workload("mix", int(args.size_gib * GiB / 3))).values())
    optimizer = keras.optimizers.Adam()
    optimizer.build(variables)  # m and v for every variable: the checkpoint is 3x the model
    scratch = tempfile.mkdtemp(prefix="gpusaver-ckpt-bench-")
    nbytes = 3 * sum(v.shape.num_elements() * v.dtype.size for v in variables)

    # One checkpoint object per contender, reused across saves, as a training loop does.
    gs_ckpt = gpusaver.Checkpoint(model=variables, optimizer=optimizer)
    tf_ckpts = {False: tf.train.Checkpoint(model=variables, optimizer=optimizer)}

    def ours(run):
        ckpt = gs_ckpt
        started = time.perf_counter()
        future = ckpt.save_async(os.path.join(scratch, f"gs{run}", "ckpt"))
        stall = time.perf_counter() - started
        future.result()
        return stall, time.perf_counter() - started

    def tf_save(run, enable_async):
        # TF's async path fails on a second save of one Checkpoint holding a Keras 3 optimizer
        # (TF 2.21: "tf.function only supports singleton tf.Variables"), so it gets a new one each time.
        ckpt = tf.train.Checkpoint(model=variables, optimizer=optimizer) if enable_async else tf_ckpts[False]
        options = tf.train.CheckpointOptions(experimental_enable_async_checkpoint=enable_async)
        started = time.perf_counter()
        ckpt.save(os.path.join(scratch, f"tf{int(enable_async)}{run}", "ckpt"), options=options)
        stall = time.perf_counter() - started
        ckpt.sync() if enable_async else None
        return stall, time.perf_counter() - started

    contenders = {"gpusaver.Checkpoint.save_async": ours,
                  "tf.train.Checkpoint.save": lambda run: tf_save(run, False),
                  "tf.train.Checkpoint.save (TF async)": lambda run: tf_save(run, True)}
    times = {name: [] for name in contenders}
    try:
        for run in range(args.runs + 1):  # run 0 is the warm-up (traced ops, first allocations)
            for name, contender in contenders.items():
                os.sync()  # no contender pays for the previous one's writeback
                result = contender(run)
                if run:
                    times[name].append(result)
                shutil.rmtree(os.path.join(scratch), ignore_errors=True)
                os.makedirs(scratch, exist_ok=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{nbytes / GiB:.2f} GiB ({len(variables)} variables + Adam's m and v), TF {tf.__version__}, "
          f"medians of {args.runs} after a warm-up, page cache")
    print(f"{'contender':38s} {'stall s':>9s} {'end-to-end s':>13s} {'GiB/s':>7s}")
    for name, samples in times.items():
        stall = statistics.median(s for s, _ in samples)
        total = statistics.median(t for _, t in samples)
        print(f"{name:38s} {stall:9.3f} {total:13.3f} {nbytes / GiB / total:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
