"""Fetching dataset files over the network: the one helper every dataset that downloads uses.

Only called when the user asks (``--download`` / ``load(download=True)``). :func:`fetch` streams
the file to a temporary file beside its destination, checks its MD5 when one is given, and only
then renames it into place, so a failed, refused or interrupted download leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import http.client
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.paths import atomic_write

__all__ = ["NETWORK_ERRORS", "DownloadError", "describe", "fetch"]

DEFAULT_TIMEOUT = 60.0  # seconds without any answer (connect or read) before giving up
CHUNK = 1 << 20
# what urllib raises when the network fails (URLError also covers HTTP errors and DNS failures)
NETWORK_ERRORS: tuple[type[BaseException], ...] = (urllib.error.URLError, http.client.HTTPException, TimeoutError,
                                                    ConnectionError)


class DownloadError(BenchError):
    """A dataset file could not be downloaded (network failure, wrong checksum, unwritable destination)."""


def fetch(url: str, dest: str | Path, md5: str | None = None, timeout: float = DEFAULT_TIMEOUT, *,
          progress: Any = None) -> Path:
    """Download ``url`` to ``dest`` and return ``dest``.

    Guarantees: on return ``dest`` is the complete file (its MD5 equal to ``md5`` when given);
    on any failure a one-line :class:`DownloadError` is raised and ``dest`` is as it was before
    (no partial or temporary file is left). ``timeout`` bounds each wait on the network.
    """
    dest = Path(dest)
    try:
        atomic_write(dest, lambda tmp: _stream(url, Path(tmp), md5, timeout, progress, dest.name))
    except NETWORK_ERRORS as exc:
        raise DownloadError(f"cannot download {dest.name} from {url}: {describe(exc)}; "
                            f"place the file at {dest} instead") from None
    except OSError as exc:
        raise DownloadError(f"cannot write {dest}: {exc.strerror or exc}") from None
    return dest


def _stream(url: str, tmp: Path, md5: str | None, timeout: float, progress: Any, name: str) -> None:
    """Copy the response body into ``tmp``; raise when its MD5 differs from ``md5``."""
    digest = hashlib.md5(usedforsecurity=False)
    with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
        length = response.headers.get("Content-Length") if response.headers is not None else None
        total = int(length) if length and str(length).isdigit() else None
        with _task(progress, f"download {name}", total) as task:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                task.advance(len(chunk))
    if md5 is not None and digest.hexdigest() != md5.lower():
        raise DownloadError(f"refused {name} downloaded from {url}: its MD5 is {digest.hexdigest()}, expected {md5} "
                            "(a corrupt download or a changed file); nothing was written")


def _task(progress: Any, description: str, total: int | None) -> Any:
    from bench.progress import Progress

    return (progress or Progress()).task(description, total)


def describe(exc: BaseException) -> str:
    """A short, one-line reason for a network failure."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        return describe(reason) if isinstance(reason, BaseException) else str(reason)
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())
