"""Every tunable of gpusaver in one place, with its default and unit. No module reads the environment."""
import dataclasses

MiB = 1 << 20
SNAPSHOT_MODES = ("auto", "reference", "host", "copy")


@dataclasses.dataclass(frozen=True)
class Options:
    """Tunables for saving and restoring.

    Attributes:
        buffer_budget: bytes of staging buffers (pinned for CUDA) a Saver may hold, and the bytes of
            restored tensors that may be in flight ahead of assignment. Default 256 MiB.
        chunk_size: bytes per staged chunk; tensors larger than this stream in pieces. Capped at
            ``buffer_budget``. Default 16 MiB.
        num_shards: data files written in parallel, one thread each. 1 gives files byte-identical
            to TF's; more uses more cores. Default 1.
        num_threads: reader threads on restore. They spend most of their time in the kernel
            (page-cache copies) with the GIL released: on the 2-core bench machine 1 GiB in 16
            large + 2000 small tensors restored in 0.38 s with 1 thread and 0.24 s with 2 to 4;
            1 GiB in 10,000 tensors in 0.94 s with 1, 0.78 s with 2 and 0.75 s with 4. Default 4.
        snapshot: what ``save_async`` holds while the files are written, and so when it returns
            and what memory it costs (``save`` waits for the files either way):

            - ``"auto"`` (default): ``"reference"`` for copy-on-write sources (the TF ``Saver``'s
              variable reads), ``"host"`` for arrays that may be mutated in place (CuPy, torch,
              numpy through ``gpusaver.save_async``).
            - ``"reference"``: hold the caller's arrays until written. Returns at once; extra
              device memory up to one model while training replaces values before they are
              written. Only safe for copy-on-write sources: an array changed in place before it
              is written is saved with its new bytes.
            - ``"host"``: copy everything to a host snapshot buffer the size of the model (page-
              locked for GPU arrays; allocated on the first save and reused) at link speed, and
              drop each device reference once its bytes are on the host; then write from host
              memory. Returns at once for copy-on-write sources, else once the copies are done
              (about the device-to-host time). Extra host memory: one model. A second host-mode
              save of the same Saver waits for the first's buffer.
            - ``"copy"``: copy through the bounded staging buffers, dropping each reference once
              its bytes are staged. Host memory stays within ``buffer_budget``; returns once the
              last chunk is staged (about the time the whole write takes).
        fsync: fsync data, index and directory before the renames (durable across power loss;
            TF does not). Default False.
        pack_threshold: tensors of at most this many bytes (capped at the chunk size) are packed
            together into one staging buffer; for GPU arrays the pack kernel gathers them on the
            device so they cross the bus in one copy. Default 64 KiB.
        storage_options: keyword arguments for the fsspec file system of URL paths (``s3://``,
            ``gs://``, ...), e.g. ``{"key": ..., "secret": ..., "client_kwargs": {"endpoint_url":
            "http://127.0.0.1:8333"}}`` for s3fs. Unused for local paths. Default: none (the
            store's own configuration: environment, ``~/.aws``, ...).
        collective_timeout: multi-worker saves (``tf.distribute``): how long a worker waits at a
            checkpoint barrier for the others before it gives up and raises (seconds). Default 600.
    """
    buffer_budget: int = 256 * MiB
    chunk_size: int = 16 * MiB
    num_shards: int = 1
    num_threads: int = 4
    snapshot: str = "auto"
    fsync: bool = False
    pack_threshold: int = 64 * 1024
    collective_timeout: float = 600.0
    # Not hashed (a dict is not hashable; still compared, so equal Options hash equally) and not
    # in repr (it may hold credentials).
    storage_options: dict = dataclasses.field(default_factory=dict, hash=False, repr=False)

    def __post_init__(self):
        if self.buffer_budget <= 0 or self.chunk_size <= 0:
            raise ValueError("buffer_budget and chunk_size must be positive (bytes)")
        if self.num_shards < 1 or self.num_threads < 1:
            raise ValueError("num_shards and num_threads must be >= 1")
        if self.snapshot not in SNAPSHOT_MODES:
            raise ValueError(f"snapshot must be one of {', '.join(map(repr, SNAPSHOT_MODES))}, "
                             f"not {self.snapshot!r}")
        if self.pack_threshold < 0:
            raise ValueError("pack_threshold must be >= 0 (bytes)")
        if not self.collective_timeout > 0:
            raise ValueError("collective_timeout must be > 0 (seconds)")
        try:  # a copy: the caller's mapping may change later
            object.__setattr__(self, "storage_options", dict(self.storage_options or {}))
        except (TypeError, ValueError):
            raise ValueError("storage_options must be a mapping of keyword arguments for the "
                             f"fsspec file system, not {self.storage_options!r}") from None

    @property
    def effective_chunk(self) -> int:
        """The chunk size actually used: ``chunk_size`` capped by the budget (bytes)."""
        return min(self.chunk_size, self.buffer_budget)

    def snapshot_mode(self, copy_on_write: bool) -> str:
        """The mode a save uses: ``snapshot`` with ``"auto"`` resolved for its kind of source."""
        if self.snapshot != "auto":
            return self.snapshot
        return "reference" if copy_on_write else "host"

    @property
    def effective_pack_threshold(self) -> int:
        """``pack_threshold`` capped at the chunk size, so a packed group fits one buffer (bytes)."""
        return min(self.pack_threshold, self.effective_chunk)
