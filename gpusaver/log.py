"""The library's one logger, ``logging.getLogger("gpusaver")``, and the lines it writes.

gpusaver prints nothing on its own: the logger has a ``NullHandler``, so its records reach only
the handlers an application configures (``logging.basicConfig(level=logging.INFO)``, or the
CLI's ``-v``). Levels: DEBUG for fallbacks (a slower path taken, and why); INFO for each completed
save and restore, with its bytes, seconds and GiB/s; ERROR for failures nobody else will report.
"""
import logging

logger = logging.getLogger("gpusaver")
logger.addHandler(logging.NullHandler())  # no "No handlers could be found", no lastResort output

_GiB = float(1 << 30)


def log_done(what: str, prefix: str, nbytes: int, seconds: float):
    """Log (INFO) that ``what`` ("save", "restore", "load", ...) of checkpoint ``prefix`` finished:
    ``nbytes`` bytes of tensor data in ``seconds`` seconds (wall clock, including the wait for
    the files), and the throughput in GiB/s."""
    if not logger.isEnabledFor(logging.INFO):  # the common case costs one check, no formatting
        return
    rate = nbytes / seconds / _GiB if seconds > 0 else float("inf")
    logger.info("%s %s: %d bytes (%.3f GiB) in %.3f s, %.2f GiB/s", what, prefix, nbytes, nbytes / _GiB,
                seconds, rate, extra={"gpusaver_what": what, "gpusaver_prefix": prefix,
                                      "gpusaver_bytes": nbytes, "gpusaver_seconds": seconds})


def log_fallback(message: str, *args):
    """Log (DEBUG) that a slower path was taken, and why."""
    logger.debug(message, *args)
