"""HTTP Range requests (RFC 9110, section 14) over a blob of known size, answered the way
docker-registry (Go's ``http.ServeContent``) answers them: one satisfiable range -> 206 with
Content-Range; several -> 206 ``multipart/byteranges``; none satisfiable, or a malformed header
-> 416 with ``Content-Range: bytes */SIZE``; ranges adding up to more than the blob -> the
whole blob (200), so overlapping ranges cannot multiply what one request costs."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

PART_TYPE = "application/octet-stream"


class Unsatisfiable(Exception):
    """The Range header is malformed or selects no byte of the blob (416)."""


def parse_range(header: str | None, size: int) -> list[tuple[int, int]] | None:
    """The ``[start, end)`` spans a Range header selects, in the order given; None when the
    whole blob is to be sent (no header, or ranges larger than the blob together)."""
    if header is None:
        return None
    unit, sep, spec = header.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes":
        raise Unsatisfiable(f"unsupported range unit in {header[:80]!r}")
    spans: list[tuple[int, int]] = []
    for item in spec.split(","):
        text = item.strip()
        if not text:
            continue
        first, dash, last = text.partition("-")
        first, last = first.strip(), last.strip()
        if not dash or not (first.isdigit() or (first == "" and last.isdigit())) or not (last == "" or last.isdigit()):
            raise Unsatisfiable(f"malformed range {text[:40]!r}")
        if first == "":  # the last N bytes
            n = min(int(last), size)
            if n > 0:
                spans.append((size - n, size))
            continue
        start = int(first)
        if last and int(last) < start:
            raise Unsatisfiable(f"malformed range {text[:40]!r}")
        if start >= size:
            continue  # not satisfiable; the others may be
        end = size if last == "" else min(int(last) + 1, size)
        spans.append((start, end))
    if not spans:
        raise Unsatisfiable(f"no range of {header[:80]!r} is within the blob's {size} bytes")
    if sum(end - start for start, end in spans) > size:
        return None
    return spans


def content_range(start: int, end: int, size: int) -> str:
    return f"bytes {start}-{end - 1}/{size}"


@dataclass(frozen=True)
class Multipart:
    """The framing of a ``multipart/byteranges`` body: before each part its delimiter and
    headers, after the last one the closing delimiter. ``length`` is the whole body's."""

    boundary: str
    heads: list[bytes]
    tail: bytes
    length: int

    @property
    def content_type(self) -> str:
        return f"multipart/byteranges; boundary={self.boundary}"


def multipart(spans: list[tuple[int, int]], size: int) -> Multipart:
    boundary = secrets.token_hex(16)
    heads = [
        (b"\r\n" if i else b"")
        + f"--{boundary}\r\nContent-Range: {content_range(s, e, size)}\r\nContent-Type: {PART_TYPE}\r\n\r\n".encode()
        for i, (s, e) in enumerate(spans)
    ]
    tail = f"\r\n--{boundary}--\r\n".encode()
    length = sum(len(h) for h in heads) + sum(e - s for s, e in spans) + len(tail)
    return Multipart(boundary, heads, tail, length)
