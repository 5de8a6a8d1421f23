"""Stream bytes received but not yet assigned to a chunk, held as zero-copy views."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator


class PendingBytes:
    """A FIFO of stream blocks covering ``[start, end)``; consumed from the front in order."""

    def __init__(self) -> None:
        self._parts: deque[memoryview] = deque()
        self.start = 0
        self.end = 0

    def append(self, data: bytes) -> None:
        if data:
            self._parts.append(memoryview(data))
            self.end += len(data)

    def __len__(self) -> int:
        return self.end - self.start

    def pieces(self, upto: int) -> Iterator[memoryview]:
        """Yield views of ``[start, upto)`` and drop them (``upto`` <= ``end``)."""
        if upto > self.end:
            raise ValueError("not received yet")
        while self.start < upto:
            part = self._parts[0]
            take = min(len(part), upto - self.start)
            if take == len(part):
                self._parts.popleft()
            else:
                self._parts[0] = part[take:]
            self.start += take
            yield part[:take]

    def take(self, upto: int) -> bytes:
        """``[start, upto)`` as one bytes object, dropped from the FIFO."""
        return b"".join(self.pieces(upto))
