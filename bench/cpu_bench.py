#!/usr/bin/env python3
"""CPU checkpoint bench: gpusaver against tf.compat.v1.train.Saver and tf.train.Checkpoint.

The same as ``gpusaver bench``; every option of ``gpusaver bench --help`` applies, e.g.
``python bench/cpu_bench.py --sizes 1 --workloads mix,small,many --runs 5``. Unlike ``gpusaver
bench``, which writes to a fresh folder, this script refreshes the committed ``bench/results/``
unless given ``--out``.

``--peers`` (or ``--no-tf``): the TF-free bench instead — the core on numpy arrays beside
safetensors, torch.save, torch DCP and np.savez (``python -m gpusaver.bench.peers --help``; it
takes ``--baseline DIR``, another checkout timed beside this one), into ``bench/results/peers/``.
"""
import os
import sys

# Runnable from a checkout without installing: the repository root holds the gpusaver package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

if __name__ == "__main__":
    args = sys.argv[1:]
    peers = any(a in ("--peers", "--no-tf") for a in args)
    args = [a for a in args if a not in ("--peers", "--no-tf")]
    if "--out" not in args:
        args += ["--out", os.path.join(RESULTS, "peers") if peers else RESULTS]
    if peers:  # never imports TensorFlow
        from gpusaver.bench.peers import main as peers_main
        sys.exit(peers_main(args))
    from gpusaver.cli import main  # noqa: E402
    sys.exit(main(["bench", *args]))
