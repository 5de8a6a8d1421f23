"""The indexer and chunk decoder on real files, without a registry: every chunk of every
encoding decodes to the original bytes, prefixes verify, and bad bytes never verify."""

from __future__ import annotations

import asyncio
import gzip
import io
import random
import struct
import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path

import pytest
import zstandard

from fixtures.build_images import Member, real_bytes, tar_bytes
from imgaccel.formats import layer_index as li
from imgaccel.formats import toc
from imgaccel.indexer.chunk_decoder import ChunkVerificationError, decode_chunk
from imgaccel.indexer.errors import LayerError, NotSeekableError
from imgaccel.indexer.full_encoder import encode_full_layer
from imgaccel.indexer.seekable_index import build_seekable_index
from imgaccel.reader.layer_reader import LayerReader
from tests.helpers import sha256

SPAN = 1 << 20


class FileRanges:
    """Range reads from a local file: the blob source for reader tests that need no registry."""

    multi_range_unsupported = False

    def __init__(self, path: Path) -> None:
        self.data = path.read_bytes()

    async def fetch_ranges(
        self,
        repo: str,
        digest: str,
        ranges: Sequence[tuple[int, int]],
        *,
        fresh: bool = False,
        chunks: Sequence[tuple[int, int, str]] | None = None,
    ) -> list[bytes]:
        return [self.data[start:end] for start, end in ranges]


@pytest.fixture(scope="module")
def layer_tar() -> bytes:
    members = [Member(f"lib/f{i:03d}.bin", real_bytes(40_000 + 3_001 * i, f"lib{chr(97 + i % 26)}")) for i in range(60)]
    members.append(Member("big/huge.bin", real_bytes(7 << 20, "python")))
    members.append(Member("link", type=tarfile.SYMTYPE, linkname="big/huge.bin"))
    members += [Member(f"tail/{i}", real_bytes(5_000, "share")) for i in range(20)]
    return tar_bytes(members)


def blob(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def gzip_cli(tar: bytes) -> bytes:
    return subprocess.run(["gzip", "-6", "-c"], input=tar, capture_output=True, check=True).stdout


def encodings(tar: bytes) -> dict[str, bytes]:
    half = len(tar) // 2
    cctx = zstandard.ZstdCompressor(level=3)
    return {
        "gzip": gzip_cli(tar),
        "gzip-multimember": gzip.compress(tar[:half]) + gzip.compress(tar[half:]),
        "zstd": b"".join(cctx.compress(tar[i : i + (3 << 20)]) for i in range(0, len(tar), 3 << 20)),
        "tar": tar,
    }


@pytest.mark.parametrize("kind", ["gzip", "gzip-multimember", "zstd", "tar"])
def test_every_chunk_and_prefix_verifies(tmp_path: Path, layer_tar: bytes, kind: str) -> None:
    data = encodings(layer_tar)[kind]
    encoding = kind.split("-")[0]
    path = blob(tmp_path, kind, data)
    built = build_seekable_index(str(path), encoding, sha256(data), SPAN)  # type: ignore[arg-type]
    index = built.index
    assert index.uncompressed_size == len(layer_tar)
    assert index.diff_id == sha256(layer_tar)  # computed from the stream, not taken on trust
    assert len(index.chunks) > 3
    for c in index.chunks:
        piece = data[c.c_offset : c.c_offset + c.c_size]
        assert c.c_digest == sha256(piece)  # the compressed range exactly as fetched (gzip: shared byte too)
        window = built.windows[c.window] if c.window >= 0 else b""
        assert decode_chunk(index.encoding, piece, c, window) == layer_tar[c.u_offset : c.u_offset + c.u_size]
        prefix = decode_chunk(index.encoding, piece, c, window, upto=1000)
        assert prefix == layer_tar[c.u_offset : c.u_offset + len(prefix)] and len(prefix) >= 1000
    # Round trip through the blob encoding, then random reads through the lazy reader.
    decoded, windows = li.decode_index_blob(li.encode_index_blob(index, built.windows))
    assert [c.c_digest for c in decoded.chunks] == [c.c_digest for c in index.chunks]
    reader = LayerReader(FileRanges(path), "repo", sha256(data), decoded, windows)
    rng = random.Random(1)
    for _ in range(40):
        off = rng.randrange(len(layer_tar))
        n = rng.choice([1, 100, 70_000, 3 << 20])
        assert asyncio.run(reader.read(off, n)) == layer_tar[off : off + n]
    names = {e.name: e for e in index.entries}
    huge = names["big/huge.bin"]
    assert layer_tar[huge.offset : huge.offset + huge.size] == real_bytes(7 << 20, "python")


def test_gzip_span_is_respected(tmp_path: Path, layer_tar: bytes) -> None:
    data = gzip_cli(layer_tar)
    built = build_seekable_index(str(blob(tmp_path, "g", data)), "gzip", sha256(data), 2 << 20)
    sizes = [c.u_size for c in built.index.chunks]
    assert all(s >= 2 << 20 for s in sizes[:-1])
    assert len(built.windows) == len([c for c in built.index.chunks if c.window >= 0])


def test_corrupt_chunk_never_verifies(tmp_path: Path, layer_tar: bytes) -> None:
    data = gzip_cli(layer_tar)
    built = build_seekable_index(str(blob(tmp_path, "g", data)), "gzip", sha256(data), SPAN)
    c = built.index.chunks[2]
    piece = bytearray(data[c.c_offset : c.c_offset + c.c_size])
    piece[len(piece) // 2] ^= 0x01
    with pytest.raises(ChunkVerificationError):
        decode_chunk("gzip", bytes(piece), c, built.windows[c.window])


def test_single_frame_zstd_is_not_seekable(tmp_path: Path, layer_tar: bytes) -> None:
    data = zstandard.ZstdCompressor().compress(layer_tar)
    with pytest.raises(NotSeekableError, match="many small frames"):
        build_seekable_index(str(blob(tmp_path, "z", data)), "zstd", sha256(data), SPAN)


@pytest.mark.parametrize("compression", ["zstd", "lz4"])
def test_full_mode_round_trip(tmp_path: Path, layer_tar: bytes, compression: str) -> None:
    src = blob(tmp_path, "src.gz", gzip_cli(layer_tar))
    out = tmp_path / "out"
    enc = encode_full_layer(str(src), "gzip", str(out), compression, chunk_size=SPAN)  # type: ignore[arg-type]
    data = out.read_bytes()
    assert enc.size == len(data) and enc.digest == sha256(data)
    assert enc.index.diff_id == sha256(layer_tar)
    tool = "zstd" if compression == "zstd" else "lz4"
    assert subprocess.run([tool, "-dc"], input=data, capture_output=True, check=True).stdout == layer_tar
    # Frames start on entry boundaries or at chunk multiples inside a large file.
    cuts = _header_offsets(layer_tar)
    for e in enc.index.entries:
        cuts.update(range(e.offset + SPAN, e.offset + e.size, SPAN))
    for c in enc.index.chunks:
        assert c.u_offset in cuts or c.u_offset == 0, c.u_offset
        assert c.u_size <= SPAN + 8192
        assert c.c_digest == sha256(data[c.c_offset : c.c_offset + c.c_size])  # the frame's own digest
    # The TOC frame sits where the annotations say, and decodes to the same index.
    toc_bytes = data[enc.toc_offset : enc.toc_offset + enc.toc_size]
    assert sha256(toc_bytes) == enc.toc_digest
    assert li.decode_index_json(toc.parse_skippable_frame(toc_bytes, toc.TOC_MAGIC)) == enc.index
    reader = LayerReader(FileRanges(out), "repo", enc.digest, enc.index)
    assert asyncio.run(reader.read(12345, 3 << 20)) == layer_tar[12345 : 12345 + (3 << 20)]


def _header_offsets(tar: bytes) -> set[int]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        return {m.offset for m in tf.getmembers()}


def test_full_mode_zstd_is_a_seekable_zstd_file(tmp_path: Path, layer_tar: bytes) -> None:
    """Third-party readers of the zstd seekable format read the blob at random offsets."""
    from pyzstd import SeekableZstdFile

    out = tmp_path / "out.zst"
    enc = encode_full_layer(str(blob(tmp_path, "t", layer_tar)), "tar", str(out), "zstd", chunk_size=SPAN)
    data = out.read_bytes()
    count, _desc, magic = struct.unpack("<IBI", data[-9:])
    assert magic == toc.SEEK_TABLE_FOOTER_MAGIC and count == len(enc.index.chunks) + 1
    with SeekableZstdFile(str(out), "r") as f:
        f.seek(5_000_000)
        assert f.read(100_000) == layer_tar[5_000_000:5_100_000]


def test_hostile_tars_fail_with_a_cause(tmp_path: Path) -> None:
    whole = tar_bytes([Member("a", real_bytes(100_000))])
    cut = whole[:60_000]
    with pytest.raises(LayerError, match="past the end of the stream"):
        encode_full_layer(str(blob(tmp_path, "cut", cut)), "tar", str(tmp_path / "o"))
    bad = gzip.compress(whole)[:-20]
    with pytest.raises(LayerError, match="truncated"):
        build_seekable_index(str(blob(tmp_path, "bad.gz", bad)), "gzip", sha256(bad))
    with pytest.raises(LayerError, match="truncated"):
        encode_full_layer(str(blob(tmp_path, "bad2.gz", bad)), "gzip", str(tmp_path / "o2"))


def test_an_index_without_compressed_digests_still_reads(layer_tar: bytes, tmp_path: Path) -> None:
    """Indexes written before ``c_digest`` existed decode as before; a malformed one is refused."""
    built = build_seekable_index(str(blob(tmp_path, "t", layer_tar)), "tar", "sha256:" + "0" * 64)
    for c in built.index.chunks:
        c.c_digest = None
    data = li.encode_index_blob(built.index, built.windows)
    assert b"c_digest" not in zstandard.ZstdDecompressor().decompressobj().decompress(data[32:])
    decoded, _ = li.decode_index_blob(data)
    assert decoded == built.index and all(c.c_digest is None for c in decoded.chunks)
    built.index.chunks[0].c_digest = "sha256:abc"
    with pytest.raises(li.IndexFormatError, match="c_digest"):
        li.decode_index_blob(li.encode_index_blob(built.index, built.windows))


def test_index_blob_rejects_damage(layer_tar: bytes, tmp_path: Path) -> None:
    built = build_seekable_index(str(blob(tmp_path, "t", layer_tar)), "tar", "sha256:" + "0" * 64)
    good = li.encode_index_blob(built.index, built.windows)
    with pytest.raises(li.IndexFormatError, match="magic"):
        li.decode_index_blob(b"X" + good[1:])
    with pytest.raises(li.IndexFormatError):
        li.decode_index_blob(good[:-3])
    with pytest.raises(li.IndexFormatError, match="version"):
        li.decode_index_blob(good[:8] + struct.pack("<I", 99) + good[12:])


def test_a_plain_tar_is_cut_into_spans_as_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain tar larger than the bytes held back for hashing (512 MiB, lowered here) indexes:
    its fixed spans are cut as the bytes arrive, not all at the end."""
    from imgaccel.indexer import seekable_index

    monkeypatch.setattr(seekable_index, "MAX_PENDING", 16 << 20)  # spans are cut every 8 MiB read
    data = tar_bytes([Member(f"f{i}", real_bytes(5 << 20, seed=str(i))) for i in range(5)])
    (tmp_path / "layer.tar").write_bytes(data)
    built = build_seekable_index(str(tmp_path / "layer.tar"), "tar", sha256(data), span=1 << 20)
    chunks = built.index.chunks
    assert [c.c_size for c in chunks[:-1]] == [1 << 20] * (len(chunks) - 1)
    assert sum(c.c_size for c in chunks) == len(data)
    for c in chunks:
        piece = data[c.c_offset : c.c_offset + c.c_size]
        assert decode_chunk("tar", piece, c) == piece
