"""The on-disk chunk cache under the lazy reader: shared, verified on read, bounded, refetching."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Sequence
from pathlib import Path

import pytest

from fixtures.build_images import Member, real_bytes, tar_bytes
from imgaccel.indexer.full_encoder import encode_full_layer
from imgaccel.indexer.seekable_index import build_seekable_index
from imgaccel.reader.chunk_cache import ChunkCache
from imgaccel.reader.layer_reader import ChunkReadError, FetchSlots, LayerReader
from tests.helpers import sha256


class Ranges:
    """Range reads from a local file, one call per request (several ranges: one multi-range
    request); ``corrupt`` damages that many of the next ranges served."""

    multi_range_unsupported = False

    def __init__(self, path: Path) -> None:
        self.data = path.read_bytes()
        self.corrupt = 0
        self.calls = 0
        self.served = 0  # byte ranges

    async def fetch_ranges(
        self,
        repo: str,
        digest: str,
        ranges: Sequence[tuple[int, int]],
        *,
        fresh: bool = False,
        chunks: Sequence[tuple[int, int, str]] | None = None,
    ) -> list[bytes]:
        self.calls += 1
        return [self.serve(start, end) for start, end in ranges]

    def serve(self, start: int, end: int) -> bytes:
        self.served += 1
        data = self.data[start:end]
        if self.corrupt:
            self.corrupt -= 1
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
        return data


@pytest.fixture(scope="module")
def tar() -> bytes:
    return tar_bytes([Member(f"f{i}", real_bytes(300_000 + i * 7_919, f"lib{chr(97 + i)}")) for i in range(20)])


def readers(tmp_path: Path, tar: bytes, mode: str, cache: ChunkCache) -> tuple[Ranges, LayerReader]:
    if mode == "index":
        blob = tmp_path / "layer.gz"
        blob.write_bytes(gzip.compress(tar))
        built = build_seekable_index(str(blob), "gzip", sha256(blob.read_bytes()), 1 << 20)
        ranges = Ranges(blob)
        return ranges, LayerReader(ranges, "r", "d", built.index, built.windows, disk_cache=cache)
    src = tmp_path / "layer.tar"
    src.write_bytes(tar)
    out = tmp_path / "layer.zst"
    enc = encode_full_layer(str(src), "tar", str(out), chunk_size=1 << 20)
    ranges = Ranges(out)
    return ranges, LayerReader(ranges, "r", enc.digest, enc.index, disk_cache=cache)


@pytest.mark.parametrize("mode", ["index", "full"])
def test_shared_cache_serves_second_reader(tmp_path: Path, tar: bytes, mode: str) -> None:
    cache = ChunkCache(tmp_path / "cache")
    _, first = readers(tmp_path, tar, mode, cache)
    assert asyncio.run(first.read(0, len(tar))) == tar
    fetched = first.stats.bytes_fetched
    assert fetched > 0
    # Another reader (another mount, another process) with the same cache fetches nothing.
    ranges2, second = readers(tmp_path, tar, mode, ChunkCache(tmp_path / "cache"))
    assert asyncio.run(second.read(123_456, 2_000_000)) == tar[123_456:2_123_456]
    assert second.stats.bytes_fetched == 0 and ranges2.calls == 0


def test_damaged_cache_entry_is_refetched_not_served(tmp_path: Path, tar: bytes) -> None:
    cache = ChunkCache(tmp_path / "cache")
    _, reader = readers(tmp_path, tar, "full", cache)
    assert asyncio.run(reader.read(0, len(tar))) == tar
    victim = next(p for p in (tmp_path / "cache" / "chunks").rglob("*") if p.is_file())
    victim.write_bytes(b"X" + victim.read_bytes()[1:])
    fresh = ChunkCache(tmp_path / "cache")
    ranges, again = readers(tmp_path, tar, "full", fresh)
    assert asyncio.run(again.read(0, len(tar))) == tar
    assert fresh.stats.corrupt == 1 and ranges.calls >= 1


def test_tiny_cache_evicts_and_still_reads(tmp_path: Path, tar: bytes) -> None:
    cache = ChunkCache(tmp_path / "cache", limit=3 << 20)
    _, reader = readers(tmp_path, tar, "index", cache)
    reader.memory_cache = 1
    for off in range(0, len(tar), 700_000):
        assert asyncio.run(reader.read(off, 700_000)) == tar[off : off + 700_000]
    assert cache.stats.evicted > 0 and cache.size() <= 3 << 20


def test_bad_transfer_is_refetched_once_then_fails(tmp_path: Path, tar: bytes) -> None:
    ranges, reader = readers(tmp_path, tar, "full", ChunkCache(tmp_path / "c1"))
    ranges.corrupt = 1
    assert asyncio.run(reader.read(0, 100_000)) == tar[:100_000]
    assert reader.stats.refetches == 1
    ranges, reader = readers(tmp_path, tar, "full", ChunkCache(tmp_path / "c2"))
    ranges.corrupt = 2
    with pytest.raises(ChunkReadError, match="failed verification"):
        asyncio.run(reader.read(0, 100_000))
    assert not [p for p in (tmp_path / "c2" / "chunks").rglob("*") if p.is_file()]  # nothing unverified cached


@pytest.mark.parametrize(
    ("gap", "multi_range", "requests", "spans"),
    [(0, True, 1, 2), (0, False, 2, 2), (8 << 20, True, 1, 1), (8 << 20, False, 1, 1)],
)
def test_nearby_chunks_share_one_request(
    tmp_path: Path, tar: bytes, gap: int, multi_range: bool, requests: int, spans: int
) -> None:
    """Chunks within ``gap`` share one byte range; the ranges of one read share one request
    when the registry answers multi-range requests."""
    ranges, reader = readers(tmp_path, tar, "full", ChunkCache(tmp_path / "c"))
    ranges.multi_range_unsupported = not multi_range
    reader.gap = gap
    c = reader.index.chunks
    asyncio.run(reader.read(c[1].u_offset, 10))  # chunk 1 is now cached: chunks 0 and 2 are separated
    before, served = ranges.calls, ranges.served
    assert asyncio.run(reader.read(0, c[2].u_offset + 10)) == tar[: c[2].u_offset + 10]
    assert (ranges.calls - before, ranges.served - served) == (requests, spans)


def test_reading_further_into_a_partly_decoded_chunk_fetches_nothing(tmp_path: Path, tar: bytes) -> None:
    ranges, reader = readers(tmp_path, tar, "index", ChunkCache(tmp_path / "c"))
    reader.readahead = 0
    first = reader.index.chunks[0]
    assert len(first.blocks) >= 2  # several 1 MiB blocks: the first read decodes only the first
    assert asyncio.run(reader.read(10, 100)) == tar[10:110]
    assert asyncio.run(reader.read(first.u_size - 100, 100)) == tar[first.u_size - 100 : first.u_size]
    assert ranges.calls == 1


class SlowRanges(Ranges):
    """Range reads that take ``delay`` seconds each and log what they asked for."""

    def __init__(self, path: Path, delay: float) -> None:
        super().__init__(path)
        self.delay = delay
        self.log: list[int] = []

    async def fetch_ranges(
        self,
        repo: str,
        digest: str,
        ranges: Sequence[tuple[int, int]],
        *,
        fresh: bool = False,
        chunks: Sequence[tuple[int, int, str]] | None = None,
    ) -> list[bytes]:
        self.log += [start for start, _ in ranges]
        await asyncio.sleep(self.delay)
        return await super().fetch_ranges(repo, digest, ranges, fresh=fresh)


def test_concurrent_reads_of_one_chunk_share_one_request(tmp_path: Path, tar: bytes) -> None:
    src = tmp_path / "layer.tar"
    src.write_bytes(tar)
    enc = encode_full_layer(str(src), "tar", str(tmp_path / "layer.zst"), chunk_size=1 << 20)
    ranges = SlowRanges(tmp_path / "layer.zst", 0.05)
    reader = LayerReader(ranges, "r", enc.digest, enc.index)

    async def go() -> list[bytes]:
        return await asyncio.gather(*(reader.read(1000 + i, 500) for i in range(8)))

    assert asyncio.run(go()) == [tar[1000 + i : 1500 + i] for i in range(8)]
    assert ranges.calls == 1


def test_foreground_read_does_not_queue_behind_background_prefetch(tmp_path: Path, tar: bytes) -> None:
    src = tmp_path / "layer.tar"
    src.write_bytes(tar)
    enc = encode_full_layer(str(src), "tar", str(tmp_path / "layer.zst"), chunk_size=256 << 10)
    ranges = SlowRanges(tmp_path / "layer.zst", 0.02)
    reader = LayerReader(ranges, "r", enc.digest, enc.index, slots=FetchSlots(total=2, background=1))
    chunks = enc.index.chunks
    last = chunks[-2]  # the last chunk of file data (the final one may hold only the tar's end)
    assert len(chunks) >= 10

    async def go() -> tuple[bytes, list[int]]:
        background = asyncio.create_task(reader.prefetch(range(len(chunks)), max_request=1))  # one chunk per request
        while not ranges.log:
            await asyncio.sleep(0.001)
        data = await reader.read(last.u_offset, last.u_size)
        return data, await background

    data, failed = asyncio.run(go())
    assert data == tar[last.u_offset : last.u_offset + last.u_size] and failed == []
    # The foreground chunk went out at once (second request), not after the queued background
    # requests; the background replay then skipped it: every chunk was fetched exactly once.
    assert ranges.log.index(last.c_offset) == 1
    assert sorted(ranges.log) == [c.c_offset for c in chunks]


def _index_reader(tmp_path: Path, tar: bytes) -> tuple[Ranges, LayerReader]:
    blob = tmp_path / "layer4m.gz"
    blob.write_bytes(gzip.compress(tar))
    built = build_seekable_index(str(blob), "gzip", sha256(blob.read_bytes()), 4 << 20)
    ranges = Ranges(blob)
    return ranges, LayerReader(ranges, "r", "d", built.index, built.windows)


def test_index_mode_fetches_only_the_blocks_a_read_needs(tmp_path: Path, tar: bytes) -> None:
    """A small read early in a 4 MiB gzip span fetches an estimated prefix of the span's
    compressed bytes, not all of them; reading further tops the prefix up."""
    ranges, reader = _index_reader(tmp_path, tar)
    reader.readahead = 0
    first = reader.index.chunks[0]
    assert len(first.blocks) >= 4
    assert asyncio.run(reader.read(1000, 100)) == tar[1000:1100]
    assert ranges.calls == 1 and reader.stats.bytes_fetched < first.c_size // 2
    end = first.u_offset + first.u_size
    assert asyncio.run(reader.read(end - 100, 100)) == tar[end - 100 : end]  # the last block: the rest
    assert ranges.calls == 2 and reader.stats.bytes_fetched == first.c_size


def test_index_mode_short_prefix_estimate_is_topped_up(
    tmp_path: Path, tar: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imgaccel.reader.layer_reader as layer_reader

    monkeypatch.setattr(layer_reader, "PREFIX_MARGIN", 0.05)
    monkeypatch.setattr(layer_reader, "PREFIX_SLACK", 1)
    ranges, reader = _index_reader(tmp_path, tar)
    reader.readahead = 0
    assert asyncio.run(reader.read(2_500_000, 5000)) == tar[2_500_000:2_505_000]
    assert ranges.calls == 2  # the estimate, then the rest of the span
    assert reader.stats.verification_failures == 0 and reader.stats.refetches == 0


def test_index_mode_prefetch_up_to_a_profile_limit(tmp_path: Path, tar: bytes) -> None:
    ranges, reader = _index_reader(tmp_path, tar)
    first = reader.index.chunks[0]
    assert asyncio.run(reader.prefetch([0], upto={0: 5000})) == []
    assert reader.is_cached(0, 5000) and not reader.is_cached(0)
    assert reader.stats.bytes_fetched < first.c_size // 2
    before = ranges.calls
    assert asyncio.run(reader.read(100, 4000)) == tar[100:4100]
    assert ranges.calls == before  # served from what the prefetch decoded


def test_profile_records_how_far_into_a_span_reads_went(tmp_path: Path, tar: bytes) -> None:
    from imgaccel.formats.profile import Profile
    from imgaccel.pusher.reference import parse_reference
    from imgaccel.reader.accelerated_image import AcceleratedImage
    from imgaccel.reader.profiles import build_profile

    _, reader = _index_reader(tmp_path, tar)
    reader.readahead = 0
    first, second = reader.index.chunks[0], reader.index.chunks[1]
    image = AcceleratedImage(parse_reference("127.0.0.1:1/r:t"), "sha256:" + "0" * 64, "m", 0, "index",
                             "sha256:" + "1" * 64, None, [reader], [reader.blob_digest])  # fmt: skip
    asyncio.run(reader.read(second.u_offset + 10, 100))  # second chunk first, near its start
    asyncio.run(reader.read(first.u_offset + 2_000_000, 5000))
    profile = Profile.model_validate_json(build_profile(image, "startup").model_dump_json())
    assert [(c.chunk, c.upto) for c in profile.chunks] == [(1, 110), (0, 2_005_000)]
    assert profile.version == 2


def test_partial_reads_of_a_verified_entry_hash_only_their_pieces(tmp_path: Path) -> None:
    """Once an entry was read and hashed whole, reads of a few bytes of it read and hash only
    the 64 KiB pieces holding them, and still never return damaged bytes."""
    cache = ChunkCache(tmp_path / "c", memory=0)  # no memory tier: every read goes to the disk
    data = real_bytes(1 << 20, "python")
    digest = sha256(data)
    cache.put(digest, data)
    assert not cache.verified(digest)
    assert cache.get_range(digest, 100, 200) == data[100:200]  # read and hashed whole
    assert cache.verified(digest)
    assert cache.get_range(digest, 700_000, 700_100) == data[700_000:700_100]
    path = next(p for p in (tmp_path / "c" / "chunks").rglob("*") if p.is_file())
    damaged = bytearray(path.read_bytes())
    damaged[900_000] ^= 0xFF
    path.write_bytes(bytes(damaged))
    assert cache.get_range(digest, 100, 200) == data[100:200]  # another piece: still intact
    assert cache.get_range(digest, 899_000, 899_100) is None  # same 64 KiB piece as the damage
    assert not path.exists() and cache.stats.corrupt == 1
    assert cache.get_range(digest, 100, 200) is None  # gone: the reader fetches it again
