#!/usr/bin/env python3
"""GPU checkpoint bench: CuPy arrays through gpusaver.save / gpusaver.load(device="cuda:0") beside raw
pinned copies of the same bytes, the NVML link rate, and the pack effect (needs CuPy and a GPU).

The same as ``gpusaver bench --gpu``; add ``--cpu`` to run the CPU bench too, e.g.
``python bench/gpu_bench.py --sizes 1 --workloads mix --runs 5``.
"""
import os
import sys

# Runnable from a checkout without installing: the repository root holds the gpusaver package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpusaver.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "--gpu", *sys.argv[1:]]))
