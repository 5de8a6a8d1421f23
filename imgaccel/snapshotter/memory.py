"""Keeping the node daemon's memory near what it uses (glibc ``mallopt`` and ``malloc_trim``).

A warm-up decodes and hashes hundreds of megabytes in worker threads; CPython frees those
buffers, but glibc keeps freed pages in its per-thread arenas (up to 8 per core), so a daemon
that has finished fetching an image would otherwise stay near its peak RSS while idle.
``limit_arenas`` caps the arenas at start; ``release_free_memory`` returns free pages after a
burst of work. Both do nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)
DAEMON_ARENAS = 2


def _glibc(name: str, *argtypes: type) -> Callable[..., int] | None:
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):  # not glibc (musl has neither): nothing to do
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_malloc_trim = _glibc("malloc_trim", ctypes.c_size_t)
_mallopt = _glibc("mallopt", ctypes.c_int, ctypes.c_int)


def limit_arenas(arenas: int = DAEMON_ARENAS) -> None:
    """Let all threads share at most ``arenas`` malloc arenas (call before starting threads)."""
    if _mallopt is not None:
        _mallopt(M_ARENA_MAX, arenas)


def release_free_memory() -> None:
    """Return the heap's free pages to the system (no-op where the C library cannot)."""
    if _malloc_trim is not None:
        _malloc_trim(0)
