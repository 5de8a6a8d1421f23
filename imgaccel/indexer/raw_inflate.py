"""Raw-deflate decoding that starts mid-stream at any bit, the zran way.

A gzip checkpoint sits on a deflate block boundary that is rarely byte-aligned.  zlib
resumes there with ``inflatePrime`` (feed the leftover bits of the previous byte) and
``inflateSetDictionary`` (the 32 KiB window).  Python's ``zlib`` module exposes neither, so
this module drives the system zlib (``libz.so.1``, the same library CPython links) through
ctypes.  The ``z_stream`` layout has been stable since zlib 1.0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
import zlib

_Z_OK = 0
_Z_STREAM_END = 1
_Z_NEED_DICT = 2
_Z_BUF_ERROR = -5
_Z_NO_FLUSH = 0


class _ZStream(ctypes.Structure):
    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p),
        ("zfree", ctypes.c_void_p),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


def _load_zlib() -> ctypes.CDLL:
    name = ctypes.util.find_library("z") or "libz.so.1"
    lib = ctypes.CDLL(name)
    lib.zlibVersion.restype = ctypes.c_char_p
    lib.inflateInit2_.argtypes = [ctypes.POINTER(_ZStream), ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.inflatePrime.argtypes = [ctypes.POINTER(_ZStream), ctypes.c_int, ctypes.c_int]
    lib.inflateSetDictionary.argtypes = [ctypes.POINTER(_ZStream), ctypes.c_char_p, ctypes.c_uint]
    lib.inflate.argtypes = [ctypes.POINTER(_ZStream), ctypes.c_int]
    lib.inflateEnd.argtypes = [ctypes.POINTER(_ZStream)]
    lib.inflateReset.argtypes = [ctypes.POINTER(_ZStream)]
    return lib


_zlib = _load_zlib()
_VERSION: bytes = _zlib.zlibVersion()


class InflateError(ValueError):
    """The compressed bytes are not valid deflate data from this checkpoint."""


class InflateInputEnded(InflateError):
    """The compressed bytes ended before ``out_size`` bytes were inflated (a caller that
    fetched only a prefix of the span may fetch more and try again)."""


def gzip_header_length(data: bytes | memoryview, pos: int) -> int:
    """Length of the gzip member header starting at ``data[pos]`` (RFC 1952)."""
    if len(data) < pos + 10 or data[pos] != 0x1F or data[pos + 1] != 0x8B or data[pos + 2] != 8:
        raise InflateError(f"no gzip member header at compressed offset {pos}")
    flags = data[pos + 3]
    p = pos + 10
    if flags & 4:  # FEXTRA
        (xlen,) = struct.unpack_from("<H", data, p)
        p += 2 + xlen
    for bit in (8, 16):  # FNAME, FCOMMENT: zero-terminated
        if flags & bit:
            end = bytes(data[p:]).find(b"\0")
            if end < 0:
                raise InflateError("gzip header runs past the fetched range")
            p += end + 1
    if flags & 2:  # FHCRC
        p += 2
    if p > len(data):
        raise InflateError("gzip header runs past the fetched range")
    return p - pos


def inflate_from_checkpoint(data: bytes, bits: int, window: bytes, out_size: int, expect_end: bool = False) -> bytes:
    """Inflate ``out_size`` bytes of a gzip stream starting at a checkpoint.

    ``data`` begins with the byte that holds the checkpoint's first bit: when ``bits`` is
    non-zero, ``data[0]`` is the partially consumed byte whose top ``bits`` bits start the
    next deflate block (zran's convention: checkpoint bit position = offset * 8 - bits).
    ``window`` is the 32 KiB of uncompressed data before the checkpoint (may be empty at the
    start of a member).  Member boundaries (gzip trailer + next header) are crossed.
    With ``expect_end``, ``data`` must end right after those bytes: the deflate stream's
    final block, then the 8-byte gzip trailer; after it, only empty gzip members (eStargz
    ends with one, its footer) and zero padding are tolerated.
    """
    out = ctypes.create_string_buffer(out_size + 1)
    strm = _ZStream()
    if _zlib.inflateInit2_(ctypes.byref(strm), -15, _VERSION, ctypes.sizeof(_ZStream)) != _Z_OK:
        raise MemoryError("inflateInit2 failed")
    try:
        pos = 0
        if bits:
            if not data:
                raise InflateError("empty compressed range")
            _zlib.inflatePrime(ctypes.byref(strm), bits, data[0] >> (8 - bits))
            pos = 1
        if window and _zlib.inflateSetDictionary(ctypes.byref(strm), window, len(window)) != _Z_OK:
            raise InflateError("cannot set the checkpoint window")
        produced = 0
        inbuf = ctypes.create_string_buffer(data, len(data))
        base_in = ctypes.addressof(inbuf)
        base_out = ctypes.addressof(out)
        while produced < out_size:
            strm.next_in = base_in + pos
            strm.avail_in = len(data) - pos
            strm.next_out = base_out + produced
            strm.avail_out = out_size - produced
            ret = _zlib.inflate(ctypes.byref(strm), _Z_NO_FLUSH)
            pos = len(data) - strm.avail_in
            produced = out_size - strm.avail_out
            if ret == _Z_STREAM_END and produced < out_size:
                pos += 8  # CRC32 + ISIZE of the finished member
                if pos >= len(data):
                    raise InflateInputEnded("gzip stream ends before the span does")
                pos += gzip_header_length(data, pos)
                _zlib.inflateReset(ctypes.byref(strm))
                continue
            if ret in (_Z_OK, _Z_STREAM_END):
                if ret == _Z_OK and strm.avail_in == 0 and produced < out_size:
                    raise InflateInputEnded("compressed range ends before the span does")
                continue
            if ret == _Z_BUF_ERROR and produced < out_size:
                raise InflateInputEnded("compressed range ends before the span does")
            msg = strm.msg.decode() if strm.msg else f"zlib error {ret}"
            raise InflateError(msg)
        if expect_end:
            _expect_end(strm, data, pos, base_in, base_out + out_size)
        return out.raw[:out_size]
    finally:
        _zlib.inflateEnd(ctypes.byref(strm))


def _expect_end(strm: _ZStream, data: bytes, pos: int, base_in: int, out_end: int) -> None:
    """The member being inflated at ``pos`` must end here, and nothing but empty members
    and zero padding may follow it."""
    spare = ctypes.create_string_buffer(1)
    while True:
        strm.next_in = base_in + pos
        strm.avail_in = len(data) - pos
        strm.next_out = out_end
        strm.avail_out = 1
        ret = _zlib.inflate(ctypes.byref(strm), _Z_NO_FLUSH)
        pos = len(data) - strm.avail_in
        if strm.avail_out == 0:
            raise InflateError("the gzip stream holds more data than its tar stream")
        if ret != _Z_STREAM_END:
            raise InflateError("the gzip stream is truncated (no end-of-stream marker)")
        pos += 8  # CRC32 + ISIZE
        if pos > len(data):
            raise InflateError("the gzip stream is truncated (its trailer is missing)")
        if not data[pos:].strip(b"\0"):
            return
        if data[pos : pos + 2] != b"\x1f\x8b":
            raise InflateError(f"the gzip stream has trailing garbage {len(data) - pos} bytes before its end")
        pos += gzip_header_length(data, pos)  # a further member: it must hold no data
        _zlib.inflateReset(ctypes.byref(strm))
        out_end = ctypes.addressof(spare)


__all__ = ["InflateError", "InflateInputEnded", "gzip_header_length", "inflate_from_checkpoint", "zlib"]
