#!/usr/bin/env python3
"""CPU checkpoint bench: gpusaver against tf.compat.v1.train.Saver and tf.train.Checkpoint.

The same as ``gpusaver bench``; every option of ``gpusaver bench --help`` applies, e.g.
``python bench/cpu_bench.py --sizes 1 --workloads mix --runs 5``. Unlike ``gpusaver bench``, which
writes to a fresh folder, this script refreshes the committed ``bench/results/`` unless given ``--out``.
"""
import os
import sys

# Runnable from a checkout without installing: the repository root holds the gpusaver package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpusaver.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--out" not in args:
        args += ["--out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")]
    sys.exit(main(["bench", *args]))
