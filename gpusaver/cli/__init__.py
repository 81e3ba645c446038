"""The ``gpusaver`` command (also ``python -m gpusaver``).

Inspect and check checkpoints (``ls``/``inspect``, ``verify``, ``diff``, ``latest``), ``merge`` them, and run the
``demo`` and the ``bench``. TensorFlow is imported only by the commands that need it (``demo``,
``bench``, and ``ls`` of an object-based checkpoint, for the names in its object graph), with its
start-up noise kept off the screen.
"""
import argparse
import logging
import os
import sys

from gpusaver.cli._common import CommandError
from gpusaver.errors import GpusaverError

__all__ = ["main", "parser"]


def _ls(args):
    from gpusaver.cli import listing
    return listing.run(args)


def _verify(args):
    from gpusaver.cli import check
    return check.run_verify(args)


def _diff(args):
    from gpusaver.cli import check
    return check.run_diff(args)


def _latest(args):
    from gpusaver.cli import check
    return check.run_latest(args)


def _merge(args):
    from gpusaver.format.merge import merge
    print(merge(args.inputs, args.destination, delete_old=not args.keep_inputs))
    return 0


def _bench(args):
    from gpusaver.cli import run
    return run.bench(args)


def _demo(args):
    from gpusaver.cli import run
    return run.demo(args)


PATH_HELP = "a checkpoint prefix, one of its files, or a directory (its latest checkpoint)"


def parser() -> argparse.ArgumentParser:
    from gpusaver import __version__
    p = argparse.ArgumentParser(prog="gpusaver", description="GPU-aware TensorFlow checkpoints.")
    p.add_argument("--version", action="version", version=f"gpusaver {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log the library's messages to stderr (-v: info, -vv: debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name in ("ls", "inspect"):
        s = sub.add_parser(name, help="list a checkpoint's tensors: name, dtype, shape, bytes, totals"
                           + (" (same as ls)" if name == "inspect" else ""))
        s.add_argument("path", help=PATH_HELP)
        s.add_argument("--tensor", metavar="NAME", help="print this tensor's values (as TF's inspect_checkpoint)")
        s.add_argument("--json", action="store_true", help="machine-readable output")
        s.set_defaults(func=_ls)

    s = sub.add_parser("verify", help="read every tensor and check every CRC32C and slice (exit 1 if any is bad)",
                       description="Reads the whole checkpoint in bounded memory; exit status 0 when sound, "
                                   "1 naming each bad tensor and file, 2 when there is no checkpoint.")
    s.add_argument("path", help=PATH_HELP)
    s.add_argument("--json", action="store_true", help="machine-readable output (no progress bar)")
    s.set_defaults(func=_verify)

    s = sub.add_parser("diff", help="tensors added, removed and changed (dtype, shape, values) from A to B",
                       description="Exit status 0 when A and B hold the same tensors and values, 1 otherwise. "
                                   "Tensors whose stored CRC32C and size agree count as equal without a read.")
    s.add_argument("a", help=PATH_HELP)
    s.add_argument("b", help=PATH_HELP)
    s.add_argument("--json", action="store_true", help="machine-readable output (no progress bar)")
    s.set_defaults(func=_diff)

    s = sub.add_parser("latest", help="print the latest checkpoint prefix in DIR (exit 1 if none)")
    s.add_argument("dir")
    s.set_defaults(func=_latest)

    s = sub.add_parser("merge", help="merge checkpoints (e.g. one per worker) into one, as TF's MergeV2Checkpoints",
                       description="Renames the inputs' data files into DESTINATION's numbering and writes one "
                                   "index over them (last, so DESTINATION exists only once complete); the "
                                   "inputs' index files are removed unless --keep-inputs.")
    s.add_argument("destination", help="the merged checkpoint's prefix")
    s.add_argument("inputs", nargs="+", help="the checkpoint prefixes to merge, in order")
    s.add_argument("--keep-inputs", action="store_true", help="leave the inputs' index files in place")
    s.set_defaults(func=_merge)

    d = sub.add_parser("demo", help="save, restore and verify a small Keras model")
    d.add_argument("dir", nargs="?", default=None, help="where to write (default: a temporary directory, removed)")
    d.set_defaults(func=_demo)

    b = sub.add_parser("bench", help="benchmark gpusaver against TensorFlow's savers",
                       description="Contenders are interleaved; 1 warm-up and --runs counted runs each; "
                                   "medians and min-max are reported with PASS/MISS against the targets. "
                                   "Exit status 1 if a restore gave wrong values or a measurement failed.")
    b.add_argument("--sizes", default="1", help="model sizes in GiB, comma-separated, e.g. 0.25,1,4 (default 1)")
    b.add_argument("--workloads", default="mix,small",
                   help="mix (16 large + 2000 small tensors), small (10,000 equal tensors), many (30,000 x 8 KiB "
                        "per GiB of --sizes); default mix,small")
    b.add_argument("--dtypes", default="float32", help="float32 and/or bfloat16 (default float32)")
    b.add_argument("--runs", type=int, default=None, help="counted runs per contender (default 5; 1 with --tiny)")
    b.add_argument("--warmup", type=int, default=None, help="uncounted runs first (default 1; 0 with --tiny)")
    b.add_argument("--out", default=None,
                   help="output directory (default: a new ./gpusaver-bench-DATE-TIME folder)")
    b.add_argument("--scratch", default=None,
                   help="where checkpoints are written (default OUT/scratch.tmp, removed after)")
    b.add_argument("--tiny", action="store_true", help="4 MiB, few tensors, 1 run: a smoke test in seconds")
    b.add_argument("--gpu", action="store_true", help="GPU mode: CuPy arrays against raw pinned copies (needs CuPy)")
    b.add_argument("--cpu", action="store_true", help="with --gpu: run the CPU bench as well")
    b.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    b.add_argument("--peers", "--no-tf", action="store_true",
                   help="without TensorFlow: the core on numpy arrays beside safetensors, torch.save, torch DCP, np.savez")
    b.add_argument("--baseline", metavar="DIR", default=None,
                   help="with --peers: another gpusaver checkout (its root) timed beside this one")
    b.set_defaults(func=_bench)
    return p


def _configure_logging(verbosity: int):
    if verbosity <= 0:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
    logger = logging.getLogger("gpusaver")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbosity == 1 else logging.DEBUG)


def main(argv=None) -> int:
    """Run the ``gpusaver`` command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.argv = argv[argv.index(args.command) + 1:] if args.command in argv else argv
    _configure_logging(args.verbose)
    # TensorFlow reads this when it loads; the CLI (never the library) quiets its C++ start-up logs.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return args.func(args)
    except CommandError as e:
        print(f"gpusaver {args.command}: {e}", file=sys.stderr)
        return e.status
    except (GpusaverError, OSError) as e:  # a checkpoint that cannot be read: the message names it
        print(f"gpusaver {args.command}: {e}", file=sys.stderr)
        return 1 if isinstance(e, GpusaverError) and not isinstance(e, FileNotFoundError) else 2
