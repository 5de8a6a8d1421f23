"""What the console's image page shows, read from the registry (data only, no HTML): an
image's source and accelerated forms with their layers, index and TOC sizes and chunk counts,
and the hot-chunk profiles of each accelerated form with their start-up series.

Everything is read with the project's own readers: manifests and referrers through
``RegistryClient``; each platform of an accelerated form through
``reader.accelerated_image.open_image`` (index blobs and TOCs verified against the digests the
manifests pin); profiles with ``reader.profiles.read_profile`` from the referrers of the
accelerated tag's top digest with the profile artifact type (newest last), as
``find_profile`` reads them.

Bounds: an index blob, a TOC or a profile blob larger than ``max_blob`` is not read (a one-line
error for that part), nor more than ``budget`` bytes of them per view; each form is read
within ``timeout`` seconds; at most ``MAX_PLATFORMS`` platforms and ``MAX_PROFILES`` profiles
of a form are read. What a digest pins (a platform's layer table, a profile) is kept in small
LRU caches; tags and referrers are asked again on every view.

"Bytes needed" by a profile is what a replay (``reader.prefetch.replay_profile``) asks the
registry for, chunk by chunk: the chunk's compressed size, or, for an index-mode chunk the
workload read only the start of (``upto``), the compressed bytes the layer reader requests
for the 1 MiB blocks covering that start (its own estimate, ``LayerReader.fetch_end``).
Neighbouring gzip chunks share a byte or two, counted for each.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from pydantic import ValidationError

from imgaccel.formats import layer_index as li
from imgaccel.formats import oci
from imgaccel.formats.profile import ANN_PROFILE_LABEL, PROFILE_ARTIFACT_TYPE, Profile
from imgaccel.formats.sizes import format_size
from imgaccel.pusher.client import Manifest, RegistryClient
from imgaccel.pusher.errors import NotFoundError, RegistryError
from imgaccel.pusher.reference import ImageRef
from imgaccel.reader.accelerated_image import ImageOpenError, open_image
from imgaccel.reader.layer_reader import LayerReader
from imgaccel.reader.profiles import read_profile

log = logging.getLogger(__name__)
Kind = Literal["source", "index", "full", "pinned"]
MAX_BLOB = 64 << 20  # bytes of one index blob, TOC or profile blob read for a view
BUDGET = 256 << 20  # bytes of index blobs and TOCs read for one view, all forms together
READ_TIMEOUT = 20.0  # seconds to read one form (its platforms and profiles)
MAX_PLATFORMS = 8  # platforms of one form read (the others are listed)
MAX_PROFILES = 20  # profiles of one form read, newest first
MAX_POINTS = 500  # points of a start-up series (more chunks: evenly spaced positions)
CACHE_ENTRIES = 32
TITLES: dict[Kind, str] = {
    "source": "Source",
    "index": "Index mode",
    "full": "Full mode",
    "pinned": "Image by digest",
}

K = TypeVar("K")
V = TypeVar("V")


class ReadLimitError(Exception):
    """Something the page would read is over the console's bounds; one line."""


class LRU(Generic[K, V]):
    """A small least-recently-used map of at most ``size`` entries."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class CappedFetcher:
    """``RangeFetcher`` for ``open_image``: the client's, refusing any read (an index blob or
    a TOC) over ``cap`` bytes and any beyond ``budget`` bytes in all."""

    def __init__(self, client: RegistryClient, cap: int, budget: int) -> None:
        self.client = client
        self.cap, self.budget = cap, budget
        self.multi_range_unsupported = False  # (only single ranges are asked for)
        self.fetched = 0

    async def fetch_ranges(
        self,
        repo: str,
        digest: str,
        ranges: Sequence[tuple[int, int]],
        *,
        fresh: bool = False,
        chunks: Sequence[tuple[int, int, str]] | None = None,
    ) -> list[bytes]:
        size = sum(end - start for start, end in ranges)
        what = f"{self.client.registry}/{repo}@{digest}"
        if size > self.cap:
            raise ReadLimitError(f"{what}: the index or TOC is {format_size(size)}, over the "
                                 f"{format_size(self.cap)} the console reads")  # fmt: skip
        if self.fetched + size > self.budget:
            raise ReadLimitError(f"{what}: not read: this page already read {format_size(self.fetched)} of "
                                 f"indexes and TOCs (at most {format_size(self.budget)})")  # fmt: skip
        self.fetched += size
        return await self.client.fetch_ranges(repo, digest, ranges, fresh=fresh, chunks=chunks)


@dataclass(frozen=True)
class LayerRow:
    position: int
    digest: str  # the blob a runtime pulls
    media_type: str
    size: int  # that blob's bytes
    original_size: int | None = None  # the source layer's bytes (accelerated forms), when known
    encoding: str | None = None  # how its chunks decode (accelerated forms)
    index_kind: str | None = None  # "index blob" (index mode) or "TOC" (full mode, or a fallback copy)
    index_size: int | None = None
    chunks: int | None = None
    uncompressed_size: int | None = None
    read_from: str | None = None  # the full-mode copy read instead of the layer (index mode, --fallback full)


@dataclass
class PlatformSummary:
    label: str  # "linux/amd64"; "" for a form that is one manifest
    manifest_digest: str
    layers: list[LayerRow] = field(default_factory=list)
    error: str | None = None

    @property
    def total_size(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def index_total(self) -> int:
        return sum(layer.index_size or 0 for layer in self.layers)

    @property
    def chunk_total(self) -> int:
        return sum(layer.chunks or 0 for layer in self.layers)


@dataclass
class _PlatformData:
    summary: PlatformSummary
    readers: list[LayerReader]  # chunk tables only (file entries and gzip windows dropped)


@dataclass
class ProfileSummary:
    artifact: str  # digest of the profile's artifact manifest
    label: str = ""
    platform: str = ""
    manifest: str = ""  # the platform manifest it was recorded for
    entries: int = 0  # chunks the profile lists
    skipped: int = 0  # of them stale (not this image's chunk) or repeated
    partial: int = 0  # of the rest, chunks read only in part (``upto``)
    costs: list[int] = field(default_factory=list)  # compressed bytes needed per chunk, first-read order
    newest: bool = False  # what readers use for its label and platform
    error: str | None = None

    @property
    def chunks(self) -> int:
        return len(self.costs)

    @property
    def needed(self) -> int:
        return sum(self.costs)

    def points(self, max_points: int = MAX_POINTS) -> list[tuple[int, int]]:
        return startup_points(self.costs, max_points)

    def quartiles(self) -> list[tuple[int, int]]:
        return quartiles(self.costs)


@dataclass
class FormSummary:
    kind: Kind
    reference: str  # registry/repository:tag (or @digest)
    tag: str
    asked: bool = False  # the form the page was asked about
    present: bool = False
    digest: str = ""
    media_type: str = ""
    mode: str | None = None  # io.imgaccel.mode of the top manifest or index
    listed_platforms: list[str] = field(default_factory=list)  # what an index lists
    platforms: list[PlatformSummary] = field(default_factory=list)
    profiles: list[ProfileSummary] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    profile_error: str | None = None

    @property
    def title(self) -> str:
        return TITLES[self.kind]

    @property
    def accelerated(self) -> bool:
        return self.mode in ("index", "full")

    @property
    def is_index(self) -> bool:
        return self.media_type in oci.INDEX_TYPES

    @property
    def total_size(self) -> int:
        """Compressed bytes of the layers of every platform read (a shared layer once)."""
        return sum({layer.digest: layer.size for p in self.platforms for layer in p.layers}.values())

    @property
    def index_total(self) -> int:
        return sum({layer.digest: layer.index_size or 0 for p in self.platforms for layer in p.layers}.values())


@dataclass
class ImageSummary:
    registry: str
    repository: str
    tag: str  # the source tag ("" for a reference by digest)
    forms: list[FormSummary]

    @property
    def status(self) -> int:
        """200 when any form was read, 502 when reading failed, 404 when none exists."""
        if any(f.present for f in self.forms):
            return 200
        return 502 if any(f.error for f in self.forms) else 404

    @property
    def error(self) -> str | None:
        if self.status == 404:
            if not self.tag:
                return f"{self.forms[0].reference}: not found"
            names = ", ".join(f.tag for f in self.forms)
            return f"{self.registry}/{self.repository}: not found (no manifest tagged {names})"
        if self.status == 502:
            return next(f.error for f in self.forms if f.error)
        return None


def one_line(e: BaseException) -> str:
    """An exception as one line of text."""
    if isinstance(e, ValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        text = f"malformed document: {where}: {first['msg']}"
    elif isinstance(e, TimeoutError):
        text = "timed out"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def source_tag(tag: str, suffixes: Sequence[str]) -> str:
    """``tag`` without the longest accelerated-tag suffix it ends with (``v1_accelerated``,
    ``v1_containerd_accelerated`` -> ``v1``)."""
    for suffix in sorted(set(suffixes), key=len, reverse=True):
        if suffix and tag.endswith(suffix) and len(tag) > len(suffix):
            return tag[: -len(suffix)]
    return tag


def startup_points(costs: Sequence[int], max_points: int = MAX_POINTS) -> list[tuple[int, int]]:
    """(chunks fetched, cumulative compressed bytes) from (0, 0) to (n, total): every position
    when there are at most ``max_points``, else ``max_points`` evenly spaced ones (the first
    and the last included)."""
    cumulative = [0]
    for c in costs:
        cumulative.append(cumulative[-1] + c)
    n = len(costs)
    if n + 1 <= max_points:
        return list(enumerate(cumulative))
    picks = sorted({round(j * n / (max_points - 1)) for j in range(max_points)})
    return [(i, cumulative[i]) for i in picks]


def quartiles(costs: Sequence[int]) -> list[tuple[int, int]]:
    """(chunks fetched, cumulative bytes) at 0, 25, 50, 75 and 100 % of the chunks."""
    cumulative = [0]
    for c in costs:
        cumulative.append(cumulative[-1] + c)
    n = len(costs)
    return [(round(q * n), cumulative[round(q * n)]) for q in (0, 0.25, 0.5, 0.75, 1)]


def replay_bytes(reader: LayerReader, position: int, upto: int | None) -> int:
    """Compressed bytes a replay requests for chunk ``position`` when the workload read its
    first ``upto`` uncompressed bytes (None: all of it)."""
    c = reader.index.chunks[position]
    return reader.fetch_end(position, upto or c.u_size) - c.c_offset


def profile_costs(profile: Profile, readers: Sequence[LayerReader]) -> tuple[list[int], int, int]:
    """(bytes needed per chunk in first-read order, entries skipped, chunks read in part).
    Skipped: entries that are not a chunk of this image (as a replay skips them), repeats."""
    costs: list[int] = []
    skipped = partial = 0
    seen: set[tuple[int, int]] = set()
    for item in profile.chunks:
        reader = readers[item.layer] if item.layer < len(readers) else None
        if (
            reader is None
            or item.chunk >= len(reader.index.chunks)
            or reader.index.chunks[item.chunk].digest != item.digest
            or (item.layer, item.chunk) in seen
        ):
            skipped += 1
            continue
        seen.add((item.layer, item.chunk))
        partial += item.upto is not None
        costs.append(replay_bytes(reader, item.chunk, item.upto))
    return costs, skipped, partial


class ImageSummaries:
    """Reads ``ImageSummary``s; keeps what digests pin in small LRU caches."""

    def __init__(
        self,
        max_blob: int = MAX_BLOB,
        budget: int = BUDGET,
        timeout: float = READ_TIMEOUT,
        cache_entries: int = CACHE_ENTRIES,
    ) -> None:
        self.max_blob, self.budget, self.timeout = max_blob, budget, timeout
        self._platforms: LRU[tuple[str, str, str, str], _PlatformData] = LRU(cache_entries)
        self._profiles: LRU[tuple[str, str, str], Profile] = LRU(cache_entries * 4)

    async def summarize(
        self, client: RegistryClient, ref: ImageRef, suffixes: Sequence[tuple[Kind, str]]
    ) -> ImageSummary:
        """The forms of ``ref``: for a tag, the source tag (the tag without an accelerated
        suffix) and the source tag with each of ``suffixes``; for a digest, that image."""
        fetcher = CappedFetcher(client, self.max_blob, self.budget)
        if ref.tag:
            base = source_tag(ref.tag, [s for _, s in suffixes])
            wanted: list[tuple[Kind, str]] = [("source", base)]
            wanted += [(kind, base + suffix) for kind, suffix in suffixes]
        else:
            assert ref.digest is not None
            base, wanted = "", [("pinned", ref.digest)]
        forms = []
        seen = set()
        for kind, reference in wanted:
            if reference in seen:
                continue
            seen.add(reference)
            shown = f"{ref.registry}/{ref.repository}{'@' if kind == 'pinned' else ':'}{reference}"
            forms.append(FormSummary(kind, shown, reference, asked=reference == (ref.tag or ref.digest)))
        await asyncio.gather(*(self._form(client, fetcher, ref.repository, form) for form in forms))
        return ImageSummary(ref.registry, ref.repository, base, forms)

    async def _form(self, client: RegistryClient, fetcher: CappedFetcher, repo: str, form: FormSummary) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self._read_form(client, fetcher, repo, form)
        except TimeoutError:
            form.error = f"{form.reference}: not read within {self.timeout:.0f} s"
        except (RegistryError, ImageOpenError, ReadLimitError, ValueError) as e:
            form.error = one_line(e)
        except Exception as e:  # a reader's bug must not take the page down: one line, logged
            log.exception("image page: %s", form.reference)
            form.error = f"{form.reference}: {type(e).__name__}: {one_line(e)}"

    async def _read_form(self, client: RegistryClient, fetcher: CappedFetcher, repo: str, form: FormSummary) -> None:
        try:
            top = await client.get_manifest(repo, form.tag)
        except NotFoundError:
            return
        form.present, form.digest, form.media_type = True, top.digest, top.media_type
        if top.media_type in oci.INDEX_TYPES:
            index = oci.ImageIndex.model_validate_json(top.data)
            form.mode = (index.annotations or {}).get(li.ANN_MODE)
            entries = [d for d in index.manifests if d.platform is not None and d.platform.os != "unknown"]
            others = [d for d in index.manifests if d.platform is None and d.artifactType is None]
            form.listed_platforms = [d.platform.label() for d in entries if d.platform is not None]
            if others:
                form.notes.append(f"{len(others)} manifests without a platform are not shown")
            if len(entries) > MAX_PLATFORMS:
                form.notes.append(f"only the first {MAX_PLATFORMS} of {len(entries)} platforms are shown")
            targets = [(d.platform.label() if d.platform else "", d.digest) for d in entries[:MAX_PLATFORMS]]
        elif top.media_type in oci.MANIFEST_TYPES:
            manifest = oci.ImageManifest.model_validate_json(top.data)
            form.mode = (manifest.annotations or {}).get(li.ANN_MODE)
            targets = [("", top.digest)]
        else:
            form.error = f"{form.reference}: not an image (media type {top.media_type!r})"
            return
        datas = await asyncio.gather(*(self._platform(client, fetcher, repo, top, form, label, digest)
                                       for label, digest in targets))  # fmt: skip
        form.platforms = [d.summary for d in datas]
        if form.accelerated:
            await self._read_profiles(client, repo, form, {d.summary.manifest_digest: d for d in datas})

    async def _platform(self, client: RegistryClient, fetcher: CappedFetcher, repo: str, top: Manifest,
                        form: FormSummary, label: str, digest: str) -> _PlatformData:  # fmt: skip
        key = (client.registry, repo, top.digest, label)
        if (cached := self._platforms.get(key)) is not None:
            return cached
        try:
            if form.accelerated:
                data = await self._accelerated_platform(client, fetcher, repo, top, label)
            else:
                data = await self._plain_platform(client, repo, label, digest)
        except (RegistryError, ImageOpenError, ReadLimitError, ValueError) as e:
            return _PlatformData(PlatformSummary(label, digest, error=one_line(e)), [])
        self._platforms.put(key, data)
        return data

    async def _plain_platform(self, client: RegistryClient, repo: str, label: str, digest: str) -> _PlatformData:
        manifest = oci.ImageManifest.model_validate_json((await client.get_manifest(repo, digest)).data)
        rows = [LayerRow(i, d.digest, d.mediaType, d.size) for i, d in enumerate(manifest.layers)]
        return _PlatformData(PlatformSummary(label, digest, rows), [])

    async def _accelerated_platform(self, client: RegistryClient, fetcher: CappedFetcher, repo: str,
                                    top: Manifest, label: str) -> _PlatformData:  # fmt: skip
        pinned = ImageRef(client.registry, repo, digest=top.digest)
        image = await open_image(client, pinned, label or None, fetcher=fetcher)
        manifest = oci.ImageManifest.model_validate_json((await client.get_manifest(repo, image.manifest_digest)).data)
        originals: dict[int, int] = {}
        if image.mode == "index":
            originals = {i: d.size for i, d in enumerate(manifest.layers)}
        elif image.source_digest:
            try:
                source = await client.get_manifest(repo, image.source_digest)
                originals = {i: d.size for i, d in enumerate(oci.ImageManifest.model_validate_json(source.data).layers)}
            except (RegistryError, ValueError):
                pass  # the source is gone: its sizes are not shown
        rows, readers = [], []
        for i, (desc, reader) in enumerate(zip(manifest.layers, image.layers, strict=True)):
            copy = reader.blob_digest != desc.digest  # index mode: a full-mode copy read instead
            is_index_blob = image.mode == "index" and not copy
            rows.append(LayerRow(
                i, desc.digest, desc.mediaType, desc.size, originals.get(i), reader.index.encoding,
                "index blob" if is_index_blob else "TOC", reader.index_size, len(reader.index.chunks),
                reader.index.uncompressed_size, reader.blob_digest if copy else None,
            ))  # fmt: skip
            # Only the chunk table is kept for profiles: file entries and gzip windows go.
            chunks_only = reader.index.model_copy(update={"entries": []})
            readers.append(LayerReader(client, repo, reader.blob_digest, chunks_only,
                                       blob_size=reader.blob_size, index_size=reader.index_size))  # fmt: skip
        return _PlatformData(PlatformSummary(label, image.manifest_digest, rows), readers)

    async def _read_profiles(
        self, client: RegistryClient, repo: str, form: FormSummary, platforms: dict[str, _PlatformData]
    ) -> None:
        try:
            descs = [d for d in await client.referrers(repo, form.digest) if d.artifactType == PROFILE_ARTIFACT_TYPE]
        except (RegistryError, ValueError) as e:
            form.profile_error = f"profiles: {one_line(e)}"
            return
        descs.reverse()  # newest first
        if len(descs) > MAX_PROFILES:
            form.notes.append(f"only the newest {MAX_PROFILES} of {len(descs)} profiles are shown")
            descs = descs[:MAX_PROFILES]
        profiles = await asyncio.gather(*(self._profile(client, repo, d.digest) for d in descs))
        labels = {d.summary.manifest_digest: d.summary.label for d in platforms.values()}
        used: set[tuple[str, str]] = set()
        for desc, profile in zip(descs, profiles, strict=True):
            label = (desc.annotations or {}).get(ANN_PROFILE_LABEL, "")
            row = ProfileSummary(desc.digest, label)
            form.profiles.append(row)
            if isinstance(profile, str):
                row.error = profile
                continue
            row.label, row.manifest, row.entries = profile.label, profile.manifest, len(profile.chunks)
            data = platforms.get(profile.manifest)
            if data is None:
                row.error = f"recorded for platform manifest {profile.manifest}, which this image does not list"
                continue
            if data.summary.error is not None:
                row.error = f"its platform could not be read: {data.summary.error}"
                continue
            row.platform = labels.get(profile.manifest, "")
            row.costs, row.skipped, row.partial = profile_costs(profile, data.readers)
            row.newest = (profile.label, profile.manifest) not in used
            used.add((profile.label, profile.manifest))

    async def _profile(self, client: RegistryClient, repo: str, digest: str) -> Profile | str:
        """The profile an artifact manifest holds, or a one-line error."""
        key = (client.registry, repo, digest)
        if (cached := self._profiles.get(key)) is not None:
            return cached
        try:
            profile = await read_profile(client, repo, digest, self.max_blob)
        except (RegistryError, ValueError) as e:
            return one_line(e)
        self._profiles.put(key, profile)
        return profile
