"""The future a save returns: it remembers whether anyone looked at its outcome."""
import concurrent.futures


class SaveFuture(concurrent.futures.Future):
    """A save's future that notes whether anyone looked at its outcome (``result()``,
    ``exception()``), so a failure nobody saw is raised by the owner's next call."""

    observed = False

    def result(self, timeout=None):
        self.observed = True
        return super().result(timeout)

    def exception(self, timeout=None):
        self.observed = True
        return super().exception(timeout)

    def cancel(self):  # the save runs on; its outcome still arrives here
        return False

    @classmethod
    def following(cls, inner: concurrent.futures.Future) -> "SaveFuture":
        """A SaveFuture that completes as ``inner`` does."""
        outer = cls()

        def copy(f):
            error = f.exception()
            if error is None:
                outer.set_result(f.result())
            else:
                outer.set_exception(error)
        inner.add_done_callback(copy)
        return outer

    @classmethod
    def done_with(cls, value) -> "SaveFuture":
        future = cls()
        future.set_result(value)
        return future


def raise_unobserved(future: concurrent.futures.Future | None):
    """Wait for ``future``; raise its error if it failed and nobody has looked at it (once)."""
    if future is None:
        return
    concurrent.futures.wait([future])
    if not getattr(future, "observed", True) and future.exception() is not None:  # exception() marks it seen
        raise future.exception()
