"""Forge raw tar streams with any header field a hostile pusher could write.

``tarfile`` refuses to write most of what an attacker would (negative sizes, sizes that lie,
NUL in names, unknown types), so tests build the 512-byte headers here, field by field as
POSIX ustar and the GNU/PAX extensions lay them out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BLOCK = 512


def number_field(value: int, width: int) -> bytes:
    """Octal when it fits, else GNU base-256 (two's complement, so negatives too)."""
    if 0 <= value < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, value)
    bits = 8 * (width - 1)
    value = max(-(1 << (bits - 1)), min(value, (1 << (bits - 1)) - 1))
    body = (value & ((1 << bits) - 1)).to_bytes(width - 1, "big")
    return (b"\xff" if value < 0 else b"\x80") + body


def _text_field(value: bytes, width: int) -> bytes:
    return value[:width].ljust(width, b"\0")


@dataclass
class Header:
    name: bytes
    type: bytes = b"0"
    size: int = 0
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 1_700_000_000
    linkname: bytes = b""
    uname: bytes = b"root"
    gname: bytes = b"root"
    devmajor: int = 0
    devminor: int = 0

    def block(self) -> bytes:
        head = (
            _text_field(self.name, 100)
            + number_field(self.mode, 8)
            + number_field(self.uid, 8)
            + number_field(self.gid, 8)
            + number_field(self.size, 12)
            + number_field(self.mtime, 12)
            + b" " * 8
            + self.type[:1].ljust(1, b"0")
            + _text_field(self.linkname, 100)
            + b"ustar\x0000"
            + _text_field(self.uname, 32)
            + _text_field(self.gname, 32)
            + number_field(self.devmajor, 8)
            + number_field(self.devminor, 8)
            + b"\0" * 155
        ).ljust(BLOCK, b"\0")
        checksum = b"%06o\0 " % (sum(head) & 0o777777)
        return head[:148] + checksum + head[156:]


def pax_records(records: dict[bytes, bytes]) -> bytes:
    out = b""
    for key, value in records.items():
        body = b" " + key + b"=" + value + b"\n"
        n = len(body) + 1
        while len(str(n).encode()) + len(body) != n:
            n = len(str(n).encode()) + len(body)
        out += str(n).encode() + body
    return out


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


@dataclass
class Member:
    """One entry: its header, the data bytes that really follow it (which need not match the
    header's size), and optional PAX records or a GNU long name/link in front of it."""

    header: Header
    data: bytes = b""
    pax: dict[bytes, bytes] = field(default_factory=dict)
    pax_size: int | None = None  # the size the PAX header declares (None: the truth)
    gnu_longname: bytes | None = None

    def encode(self) -> bytes:
        out = b""
        if self.gnu_longname is not None:
            body = self.gnu_longname + b"\0"
            out += Header(b"././@LongLink", b"L", len(body)).block() + padded(body)
        if self.pax:
            body = pax_records(self.pax)
            size = len(body) if self.pax_size is None else self.pax_size
            out += Header(b"././@PaxHeader", b"x", size).block() + padded(body)
        return out + self.header.block() + padded(self.data)


def forge(members: list[Member], end: bytes = b"\0" * (2 * BLOCK)) -> bytes:
    return b"".join(m.encode() for m in members) + end


def regular(name: str | bytes, data: bytes, **kw: object) -> Member:
    raw = name.encode() if isinstance(name, str) else name
    return Member(Header(raw, b"0", len(data), **kw), data)  # type: ignore[arg-type]
