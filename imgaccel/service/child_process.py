"""The Python child processes the service runs a job's heavy step in (a conversion, a profile
run): ``python -m <module>`` in a session of its own (killing its process group takes its
helpers too), the request written to its stdin, its stdout read line by line by the caller,
its stderr relayed to the service's log (the last lines kept for an error message)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import deque
from collections.abc import Mapping

log = logging.getLogger(__name__)
MAX_LINE = 1 << 20  # bytes of one line from the child


async def spawn_module(module: str, env: Mapping[str, str] | None = None) -> asyncio.subprocess.Process:
    """``python -m module`` with piped stdin, stdout and stderr, in a new session; OSError."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", module,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True, limit=MAX_LINE, env=dict(env) if env is not None else None,
    )  # fmt: skip


async def relay_stderr(stream: asyncio.StreamReader, tail: deque[str], prefix: str, level: int) -> None:
    """Each stderr line to the log at ``level`` after ``prefix``; the last ones kept in ``tail``."""
    while line := await stream.readline():
        text = line.decode(errors="replace").rstrip()
        tail.append(text)
        log.log(level, "%s: %s", prefix, text)
