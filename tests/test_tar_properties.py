"""Property tests: tar streams with arbitrary header fields (sizes, types, names, link targets,
PAX records, GNU long names, trailing bytes) through both conversion modes and the lazy reader.

For every stream, each mode either succeeds with output identical to an independent
extraction (stdlib ``tarfile`` on the raw bytes), or fails with a one-line ``LayerError``. It
never hangs (an alarm ends an example after a few seconds), never allocates for what a
header merely declares (the address space is capped a fixed amount above the process's
size), and never reads outside the blob (the reader's source refuses any range past it).
Examples that once failed are kept as ``@example``s.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import re
import resource
import signal
import tarfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from imgaccel.formats.layer_index import LayerIndex
from imgaccel.indexer.errors import LayerError
from imgaccel.indexer.full_encoder import encode_full_layer
from imgaccel.indexer.limits import TarLimits
from imgaccel.indexer.seekable_index import build_seekable_index
from imgaccel.reader.layer_reader import LayerReader
from tests.helpers import sha256
from tests.tar_forge import BLOCK, Header, Member, forge, regular

HEADROOM = 1536 << 20  # address space an example may add to the process
SECONDS = 20  # per example (generous: two cores shared with other tests)
LIMITS = TarLimits(max_header_bytes=64 << 10, max_entries=200, max_expansion=1100)


class Hang(Exception):
    pass


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


@contextmanager
def bounded() -> Iterator[None]:
    """Cap memory and wall time for one example; a breach fails it (MemoryError or Hang)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)

    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"no answer within {SECONDS} s")

    old = signal.signal(signal.SIGALRM, alarm)
    resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + HEADROOM, hard))
    signal.setitimer(signal.ITIMER_REAL, SECONDS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, old)


class BlobRanges:
    """Range reads of the blob that refuse any byte outside it."""

    multi_range_unsupported = False

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def fetch_ranges(
        self,
        repo: str,
        digest: str,
        ranges: Sequence[tuple[int, int]],
        *,
        fresh: bool = False,
        chunks: Sequence[tuple[int, int, str]] | None = None,
    ) -> list[bytes]:
        for start, end in ranges:
            assert 0 <= start <= end <= len(self.data), f"read {start}-{end} outside a {len(self.data)}-byte blob"
        return [self.data[start:end] for start, end in ranges]


def reference(tar: bytes) -> list[tuple[tarfile.TarInfo, bytes | None]] | None:
    """tarfile's own reading of the raw stream (None if it refuses it)."""
    try:
        out = []
        with tarfile.open(fileobj=io.BytesIO(tar), mode="r:", encoding="utf-8", errors="surrogateescape") as tf:
            for ti in tf:
                data = None
                if ti.isreg():
                    f = tf.extractfile(ti)
                    data = f.read() if f else None
                out.append((ti, data))
        return out
    except (tarfile.TarError, OSError, ValueError):
        return None


def assert_matches_reference(index: LayerIndex, blob: bytes, tar: bytes, windows: list[bytes]) -> None:
    """Every entry is the one tarfile reads, and the lazy reader returns every file's bytes."""
    ref = reference(tar)
    assert ref is not None, "converted a stream that tarfile itself cannot read"
    assert [e.name for e in index.entries] == [ti.name for ti, _ in ref]
    reader = LayerReader(BlobRanges(blob), "repo", sha256(blob), index, windows)  # type: ignore[arg-type]
    for entry, (ti, data) in zip(index.entries, ref, strict=True):
        if entry.type != "reg":
            assert entry.linkname == ti.linkname
            continue
        assert (entry.size, entry.offset) == (ti.size, ti.offset_data)
        assert asyncio.run(reader.read(entry.offset, entry.size)) == data


def one_line(e: Exception) -> None:
    assert "\n" not in str(e) and str(e), repr(e)
    event("refused: " + re.sub(r"'.*'|\d+", "_", str(e))[:60])  # what kinds of refusal occur


# -- strategies ---------------------------------------------------------------------------


def mostly(usual: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``usual`` about four times in five: streams stay valid often enough to read back."""
    return st.one_of(usual, usual, usual, usual, hostile)


plain_names = st.from_regex(rb"\A[a-z]{1,8}(/[a-z.]{1,8}){0,3}\Z", fullmatch=True)
names = mostly(
    plain_names,
    st.one_of(
        st.sampled_from([b"./c", b"/abs/d", b"../up", b"a/../../x", b"caf\xff", b"n\x00ul", b"", b".", b"a//b"]),
        st.binary(min_size=1, max_size=120),
    ),
)
hostile_sizes = st.one_of(
    st.integers(min_value=0, max_value=3000),
    st.sampled_from([-1, -512, -(1 << 40), 1 << 33, 1 << 60, 1 << 87, 8**11 - 1]),
)
types = mostly(
    st.sampled_from([b"0", b"5", b"2", b"1"]),
    st.sampled_from([b"\0", b"3", b"4", b"6", b"7", b"g", b"S", b"V", b"Z"]),
)
pax_keys = st.sampled_from([b"path", b"linkpath", b"size", b"uid", b"mtime", b"SCHILY.xattr.user.k", b"comment", b"x"])
pax_values = st.one_of(
    st.sampled_from([b"-5", b"99999999999999999999", b"../../etc/passwd", b"p\x00q", b"\xff\xfe", b"1e400", b"12"]),
    st.binary(max_size=40),
)


@st.composite
def members(draw: st.DrawFn) -> Member:
    """An honest entry seven times in ten; otherwise each field may be hostile."""
    data = draw(st.binary(max_size=2000))
    if draw(st.integers(0, 9)) < 7:
        kind = draw(st.sampled_from([b"0", b"0", b"5", b"2", b"1"]))
        size = len(data) if kind == b"0" else 0
        name, link = draw(plain_names), draw(plain_names)
        return Member(Header(name, kind, size, linkname=link), data if kind == b"0" else b"")
    header = Header(
        name=draw(names),
        type=draw(types),
        size=draw(mostly(st.just(len(data)), hostile_sizes)),
        mode=draw(mostly(st.just(0o644), st.sampled_from([0o7777, -1, 1 << 40]))),
        uid=draw(mostly(st.just(0), st.sampled_from([1000, -1, 1 << 50]))),
        mtime=draw(mostly(st.just(1_700_000_000), st.sampled_from([0, -1, 1 << 60]))),
        linkname=draw(names),
    )
    pax = draw(mostly(st.just({}), st.dictionaries(pax_keys, pax_values, min_size=1, max_size=3)))
    pax_size = draw(mostly(st.none(), hostile_sizes))
    longname = draw(mostly(st.none(), names))
    return Member(header, data, pax, pax_size, longname)


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    end = draw(mostly(st.just(b"\0" * 1024), st.sampled_from([b"", b"\0" * 512, b"\0" * 4096])))
    tar = forge(draw(st.lists(members(), min_size=1, max_size=5)), end=end)
    tail = draw(mostly(st.just(b""), st.sampled_from([b"garbage", b"\0" * 7])))
    cut = draw(st.one_of(st.none(), st.none(), st.none(), st.none(), st.none(), st.integers(0, max(len(tar) - 1, 0))))
    return (tar if cut is None else tar[:cut]) + tail


def _regression(*ms: Member) -> bytes:
    return forge(list(ms))


NEGATIVE_SIZE = _regression(Member(Header(b"neg", b"0", -512), b"x" * 1024))
NEGATIVE_LONGNAME = _regression(Member(Header(b"././@LongLink", b"L", -512)), regular("a", b"1"))
HUGE_SIZE = _regression(Member(Header(b"huge", b"0", 1 << 87), b"x" * 600))
BIG_PAX = _regression(Member(Header(b"p", b"0", 3), b"abc", {b"comment": b"z" * (100 << 10)}))
NEGATIVE_PAX_SIZE = _regression(Member(Header(b"p", b"0", 3), b"abc", {b"size": b"-1024"}))
NUL_IN_PAX_PATH = _regression(Member(Header(b"p", b"0", 3), b"abc", {b"path": b"a\x00b"}))


# -- properties ---------------------------------------------------------------------------

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.timeout(900)
@SETTINGS
@given(tar=streams(), codec=st.sampled_from(["tar", "gzip", "zstd"]))
@example(tar=NEGATIVE_SIZE, codec="gzip")
@example(tar=NEGATIVE_SIZE, codec="tar")
@example(tar=NEGATIVE_LONGNAME, codec="tar")
@example(tar=HUGE_SIZE, codec="zstd")
@example(tar=BIG_PAX, codec="gzip")
@example(tar=NEGATIVE_PAX_SIZE, codec="tar")
@example(tar=NUL_IN_PAX_PATH, codec="tar")
def test_index_mode_reads_back_or_fails_in_one_line(tmp_path_factory: pytest.TempPathFactory, tar: bytes,
                                                    codec: str) -> None:  # fmt: skip
    if codec == "gzip":
        blob = gzip.compress(tar, 1)
    elif codec == "zstd":  # many small frames, as index mode needs
        cctx = zstandard.ZstdCompressor(level=1)
        blob = b"".join(cctx.compress(tar[i : i + 4096]) for i in range(0, max(len(tar), 1), 4096))
    else:
        blob = tar
    path = tmp_path_factory.mktemp("prop") / "blob"
    path.write_bytes(blob)
    with bounded():
        try:
            built = build_seekable_index(str(path), codec, sha256(blob), 64 << 10, limits=LIMITS)  # type: ignore[arg-type]
        except LayerError as e:
            one_line(e)
            return
        event(f"indexed {len(built.index.entries)} entries")
        assert built.index.diff_id == sha256(tar)
        assert not built.windows or codec == "gzip"
        assert_matches_reference(built.index, blob, tar, built.windows)


@pytest.mark.timeout(900)
@SETTINGS
@given(tar=streams())
@example(tar=NEGATIVE_SIZE)
@example(tar=NEGATIVE_LONGNAME)
@example(tar=HUGE_SIZE)
@example(tar=BIG_PAX)
@example(tar=NEGATIVE_PAX_SIZE)
@example(tar=NUL_IN_PAX_PATH)
def test_full_mode_keeps_the_tar_or_fails_in_one_line(tmp_path_factory: pytest.TempPathFactory, tar: bytes) -> None:
    d = tmp_path_factory.mktemp("prop")
    src, out = d / "src.tar", d / "out.zst"
    src.write_bytes(tar)
    with bounded():
        try:
            enc = encode_full_layer(str(src), "tar", str(out), chunk_size=2048, frame_size=1024, limits=LIMITS)
        except LayerError as e:
            one_line(e)
            return
        event(f"converted {len(enc.index.entries)} entries")
        blob = out.read_bytes()
        whole = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()
        assert whole == tar  # byte for byte, so the config's diff_id stays valid
        assert enc.index.diff_id == sha256(tar)
        assert_matches_reference(enc.index, blob[: enc.toc_offset], tar, [])


def test_a_negative_size_fails_fast_in_both_modes(tmp_path: Path) -> None:
    """The issue's first report, kept literal: tarfile alone would loop forever on it."""
    src = tmp_path / "neg.tar"
    src.write_bytes(NEGATIVE_SIZE)
    with bounded(), pytest.raises(LayerError, match="negative size"):
        build_seekable_index(str(src), "tar", sha256(NEGATIVE_SIZE))
    with bounded(), pytest.raises(LayerError, match="negative size"):
        encode_full_layer(str(src), "tar", str(tmp_path / "o"))


def test_blocks_of_forged_headers_are_what_tarfile_reads() -> None:
    """The forge itself: an honest member round-trips through tarfile."""
    tar = forge([regular("dir/file", b"hello", uid=7)])
    ((ti, data),) = reference(tar) or []
    assert (ti.name, ti.uid, data) == ("dir/file", 7, b"hello")
    assert len(tar) % BLOCK == 0
