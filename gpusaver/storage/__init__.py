"""Where checkpoint bytes live: :func:`for_url` picks the storage for a path or URL.

A plain path (``ckpt/model-1``, ``/data/ckpt``) is the local file system; a URL with a scheme
(``s3://bucket/ckpt/model-1``, ``gs://``, ``memory://``, ``file://``) goes through fsspec, with
``Options.storage_options`` (credentials, ``client_kwargs={'endpoint_url': ...}``) passed to the
file system.
"""
import os
import re

from gpusaver.storage.base import ReadHandle, Storage, WriteStream
from gpusaver.storage.local import LocalStorage

__all__ = ["Storage", "ReadHandle", "WriteStream", "LocalStorage", "for_url", "is_url", "scheme"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_LOCAL = LocalStorage()


def scheme(path) -> str | None:
    """The URL scheme of ``path`` (``"s3"``), or None for a local path."""
    m = _SCHEME.match(path) if isinstance(path, str) else None
    return m.group(1).lower() if m else None


def is_url(path) -> bool:
    """Whether ``path`` is a URL (has a scheme), i.e. not a local path."""
    return scheme(path) is not None


def for_url(path, options=None) -> Storage:
    """The storage that holds ``path``: :class:`LocalStorage` for a local path (str or
    os.PathLike), an fsspec storage for a URL, configured with ``options.storage_options``
    (``options``: a :class:`gpusaver.Options` or None).

    Raises ImportError naming the extra to install (``gpusaver[remote]``) when fsspec, or the
    package of the URL's scheme (s3fs for s3://), is missing.
    """
    if not isinstance(path, str):
        path = os.fspath(path)
    protocol = scheme(path) if isinstance(path, str) else None
    if protocol is None:
        return _LOCAL
    from gpusaver.storage.fsspec import FsspecStorage  # fsspec is imported only for URLs
    return FsspecStorage(path, protocol, getattr(options, "storage_options", None))
