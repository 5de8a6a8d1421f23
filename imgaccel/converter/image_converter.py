"""Convert one image reference into its accelerated twin.

Order of work, so that an interrupted conversion never leaves a tag on an incomplete image:
resolve and validate everything (manifests, configs, layer media types) -> per layer: reuse
a recorded conversion or download (digest-checked), convert, upload (size re-checked) ->
push new manifests by digest -> push the tagged manifest or index last.

Index-only: ``<tag>_accelerated`` is an OCI index holding each untouched source manifest plus,
per platform, an artifact manifest (platform ``unknown/unknown``, ``subject`` = the source
manifest) whose layers are the index blobs; the artifact is also registered as a referrer of
the source manifest. Full: a new image manifest with tar+zstd (or lz4) layers and the source
config, or an index of them for multi-platform sources.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import ValidationError

from imgaccel.converter.errors import ConversionError, NotConvertible
from imgaccel.converter.layer_cache import LayerCache, empty_config
from imgaccel.converter.options import ConvertOptions, Mode
from imgaccel.formats import layer_index as li
from imgaccel.formats import oci
from imgaccel.indexer.blob_format import check_encoding, declared_encoding
from imgaccel.indexer.errors import LayerError, NotSeekableError
from imgaccel.indexer.full_encoder import encode_full_layer
from imgaccel.indexer.seekable_index import build_seekable_index
from imgaccel.pusher.client import Manifest, RegistryClient
from imgaccel.pusher.errors import RegistryError
from imgaccel.pusher.reference import ImageRef

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Callbacks the CLI and the service use to show progress (all optional)."""

    on_layer_start: Callable[[str, int], None] = lambda digest, size: None
    on_bytes: Callable[[str, int], None] = lambda digest, n: None  # n more bytes of the layer downloaded
    on_layer_done: Callable[[str, bool], None] = lambda digest, reused: None


@dataclass
class ConvertResult:
    source: ImageRef
    target: ImageRef
    digest: str  # of the pushed top-level manifest or index
    layers_converted: int = 0
    layers_reused: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    size_before: int = 0  # source layers of the converted platforms
    size_after: int = 0  # their index blobs (index mode) or converted layers (full mode)
    up_to_date: bool = False


@dataclass
class _PlatformImage:
    manifest: Manifest
    parsed: oci.ImageManifest
    platform: oci.Platform
    config: oci.ImageConfig


def platform_matches(p: oci.Platform, wanted: tuple[str, ...]) -> bool:
    if not wanted:
        return True
    label = p.label()
    return any(label == w or f"{p.os}/{p.architecture}" == w for w in wanted)


class ImageConverter:
    def __init__(self, client: RegistryClient, options: ConvertOptions, progress: Progress | None = None) -> None:
        self.client = client
        self.options = options
        self.progress = progress or Progress()
        self.cache = LayerCache(client, options.cache_repo)
        self._layer_slots = asyncio.Semaphore(max(options.layer_jobs, 1))
        self._cpu_slot = asyncio.Semaphore(1)  # CPU work already uses every core

    # -- resolution -----------------------------------------------------------------------

    async def _load_platform(self, repo: str, desc: oci.Descriptor | None, manifest: Manifest) -> _PlatformImage:
        what = f"{self.client.registry}/{repo}@{manifest.digest}"
        limits = self.options.limits
        if manifest.media_type not in oci.MANIFEST_TYPES:
            raise ConversionError(f"{what}: unsupported manifest media type {manifest.media_type!r}")
        try:
            parsed = oci.ImageManifest.model_validate_json(manifest.data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConversionError(f"{what}: malformed manifest: {where}: {first['msg']}") from e
        if parsed.config.mediaType not in oci.IMAGE_CONFIG_TYPES:
            kind = parsed.artifactType or parsed.config.mediaType
            raise NotConvertible(f"{what}: not a container image (config media type {kind})")
        if parsed.annotations and li.ANN_MODE in parsed.annotations:
            raise NotConvertible(f"{what}: already an imgaccel {parsed.annotations[li.ANN_MODE]} image")
        if len(parsed.layers) > limits.max_layers:
            raise ConversionError(f"{what}: {len(parsed.layers)} layers, over the limit max_layers={limits.max_layers}")
        for layer in parsed.layers:
            try:
                declared_encoding(layer.mediaType)
            except LayerError as e:
                raise ConversionError(f"{what}: layer {layer.digest}: {e}") from None
        if parsed.config.size > limits.max_config_bytes:
            raise ConversionError(
                f"{what}: config {parsed.config.digest} is {parsed.config.size} bytes, "
                f"over the limit max_config_bytes={limits.max_config_bytes}"
            )
        cfg_bytes = await self.client.read_blob(repo, parsed.config.digest, max_size=limits.max_config_bytes)
        try:
            config = oci.ImageConfig.model_validate_json(cfg_bytes)
        except ValueError:
            raise ConversionError(f"{what}: config {parsed.config.digest} is not an image config") from None
        if len(config.rootfs.diff_ids) != len(parsed.layers):
            raise ConversionError(
                f"{what}: config lists {len(config.rootfs.diff_ids)} diff_ids for {len(parsed.layers)} layers"
            )
        platform = (
            desc.platform
            if desc and desc.platform
            else oci.Platform(architecture=config.architecture or "unknown", os=config.os or "unknown")
        )
        return _PlatformImage(manifest, parsed, platform, config)

    async def _get_manifest(self, repo: str, reference: str) -> Manifest:
        m = await self.client.get_manifest(repo, reference)
        limit = self.options.limits.max_manifest_bytes
        if len(m.data) > limit:
            raise ConversionError(
                f"{self.client.registry}/{repo}@{m.digest}: manifest is {len(m.data)} bytes, "
                f"over the limit max_manifest_bytes={limit}"
            )
        return m

    async def _platform_images(self, ref: ImageRef, index: Manifest, depth: int) -> list[_PlatformImage]:
        """The runnable platform images an index lists, following nested indexes."""
        limits = self.options.limits
        what = f"{self.client.registry}/{ref.repository}@{index.digest}"
        if depth > limits.max_index_depth:
            raise ConversionError(f"{what}: indexes nest deeper than max_index_depth={limits.max_index_depth}")
        parsed = oci.ImageIndex.model_validate_json(index.data)
        if len(parsed.manifests) > limits.max_index_manifests:
            raise ConversionError(
                f"{what}: {len(parsed.manifests)} manifests, over the limit max_index_manifests="
                f"{limits.max_index_manifests}"
            )
        images = []
        for desc in parsed.manifests:
            if desc.mediaType in oci.INDEX_TYPES:
                nested = await self._get_manifest(ref.repository, desc.digest)
                images += await self._platform_images(ref, nested, depth + 1)
                continue
            if desc.platform is None or desc.platform.os == "unknown":
                continue  # attestations and other non-runnable entries
            if not platform_matches(desc.platform, self.options.platforms):
                continue
            m = await self._get_manifest(ref.repository, desc.digest)
            images.append(await self._load_platform(ref.repository, desc, m))
        return images

    async def resolve(self, ref: ImageRef) -> tuple[Manifest, list[_PlatformImage]]:
        top = await self._get_manifest(ref.repository, ref.reference)
        if top.media_type in oci.INDEX_TYPES:
            images = await self._platform_images(ref, top, 1)
            if not images:
                raise ConversionError(f"{ref}: no platform manifest matches {list(self.options.platforms) or 'any'}")
            return top, images
        image = await self._load_platform(ref.repository, None, top)
        if not platform_matches(image.platform, self.options.platforms):
            raise ConversionError(
                f"{ref}: platform {image.platform.label()} does not match {list(self.options.platforms)}"
            )
        return top, [image]

    # -- per layer ------------------------------------------------------------------------

    async def _convert_layer(
        self, repo: str, layer: oci.Descriptor, diff_id: str, mode: Mode, result: ConvertResult
    ) -> oci.Descriptor:
        key = self.options.layer_key(mode)
        cached = await self.cache.lookup(key, layer.digest, repo)
        if cached is not None and (cached.annotations or {}).get(li.ANN_LAYER_DIFF_ID) != diff_id:
            if li.ANN_LAYER_DIFF_ID in (cached.annotations or {}):
                raise ConversionError(
                    f"layer {layer.digest}: uncompressed content hashes to "
                    f"{(cached.annotations or {})[li.ANN_LAYER_DIFF_ID]}, but the config says {diff_id} "
                    "(diff_ids out of order)"
                )
            cached = None  # recorded before diff_ids were recorded: convert (and verify) again
        if cached is not None:
            result.layers_reused += 1
            self.progress.on_layer_done(layer.digest, True)
            return cached
        async with self._layer_slots:
            self.progress.on_layer_start(layer.digest, layer.size)
            with tempfile.TemporaryDirectory(prefix="imgaccel-", dir=self.options.workdir) as tmp:
                src = os.path.join(tmp, "layer")
                t0 = time.monotonic()
                await self.client.download_blob(
                    repo, layer.digest, src, layer.size, lambda n: self.progress.on_bytes(layer.digest, n)
                )
                result.bytes_in += layer.size
                t1 = time.monotonic()
                async with self._cpu_slot:
                    if mode == "full":
                        desc = await self._full_streamed(repo, src, tmp, layer, diff_id)
                    else:
                        desc, upload = await asyncio.to_thread(self._convert_file, src, tmp, layer, diff_id, mode)
                t2 = time.monotonic()
                if mode != "full":
                    await self.client.upload_blob(repo, desc.digest, upload)
                result.bytes_out += desc.size
                log.info(
                    "layer %s: download %.2fs, %s %.2fs, upload %.2fs (%d -> %d bytes)",
                    layer.digest, t1 - t0, mode, t2 - t1, time.monotonic() - t2, layer.size, desc.size,
                )  # fmt: skip
        await self.cache.store(key, layer.digest, repo, desc)
        result.layers_converted += 1
        self.progress.on_layer_done(layer.digest, False)
        return desc

    async def _full_streamed(
        self, repo: str, src: str, tmp: str, layer: oci.Descriptor, diff_id: str
    ) -> oci.Descriptor:
        """Full mode, uploading the new blob while it is being encoded (falls back to a plain
        upload once encoding is done if the streamed session fails). Nothing references the
        blob until its digest is committed and re-checked."""
        out = os.path.join(tmp, "full")
        open(out, "wb").close()
        written = 0
        finished = asyncio.Event()

        def on_output(n: int) -> None:
            nonlocal written
            written = n

        uploader = asyncio.create_task(self.client.upload_growing_file(repo, out, lambda: written, finished))
        try:
            desc, _ = await asyncio.to_thread(self._convert_file, src, tmp, layer, diff_id, "full", on_output)
        except BaseException:
            uploader.cancel()
            await asyncio.gather(uploader, return_exceptions=True)
            await self.client.cancel_upload(repo, out)
            raise
        finished.set()
        try:
            await uploader
            await self.client.commit_upload(repo, out, desc.digest, desc.size)
        except RegistryError as e:
            log.warning("%s: streamed upload failed (%s); uploading the finished blob", layer.digest, e)
            await self.client.cancel_upload(repo, out)
            await self.client.upload_blob(repo, desc.digest, out)
        return desc

    def _convert_file(
        self,
        src: str,
        tmp: str,
        layer: oci.Descriptor,
        diff_id: str,
        mode: Mode,
        on_output: Callable[[int], None] | None = None,
    ) -> tuple[oci.Descriptor, str]:
        what = f"layer {layer.digest}"
        try:
            with open(src, "rb") as f:
                encoding = check_encoding(f, layer.mediaType, what)
            if mode == "index":
                try:
                    built = build_seekable_index(
                        src,
                        encoding,
                        layer.digest,
                        self.options.span,
                        self.options.gzip_threads,
                        self.options.limits.tar(),
                    )
                except NotSeekableError:
                    if self.options.fallback != "full":
                        raise
                    log.info("%s is not seekable; storing a full-mode copy for lazy reads", what)
                    return self._encode_full(src, tmp, layer, diff_id, encoding)
                _check_diff_id(built.index, diff_id)
                data = li.encode_index_blob(built.index, built.windows)
                out = os.path.join(tmp, "index")
                with open(out, "wb") as f:
                    f.write(data)
                desc = oci.Descriptor(
                    mediaType=li.INDEX_BLOB_MEDIA_TYPE,
                    digest=oci.sha256_digest(data),
                    size=len(data),
                    annotations={li.ANN_LAYER_DIGEST: layer.digest, li.ANN_LAYER_DIFF_ID: diff_id},
                )
                return desc, out
            return self._encode_full(src, tmp, layer, diff_id, encoding, on_output)
        except LayerError as e:
            raise ConversionError(f"{what}: {e}") from e

    def _encode_full(
        self,
        src: str,
        tmp: str,
        layer: oci.Descriptor,
        diff_id: str,
        encoding: li.Encoding,
        on_output: Callable[[int], None] | None = None,
    ) -> tuple[oci.Descriptor, str]:
        out = os.path.join(tmp, "full")
        enc = encode_full_layer(
            src,
            encoding,
            out,
            self.options.compression,
            self.options.chunk_size,
            self.options.level,
            on_output=on_output,
            frame_size=self.options.frame_size,
            limits=self.options.limits.tar(),
        )
        _check_diff_id(enc.index, diff_id)
        media_type = oci.LAYER_ZSTD if self.options.compression == "zstd" else li.LAYER_LZ4
        desc = oci.Descriptor(
            mediaType=media_type,
            digest=enc.digest,
            size=enc.size,
            annotations={
                li.ANN_LAYER_DIGEST: layer.digest,
                li.ANN_LAYER_DIFF_ID: diff_id,
                li.ANN_TOC_OFFSET: str(enc.toc_offset),
                li.ANN_TOC_SIZE: str(enc.toc_size),
                li.ANN_TOC_DIGEST: enc.toc_digest,
                li.ANN_UNCOMPRESSED_SIZE: str(enc.index.uncompressed_size),
            },
        )
        return desc, out

    # -- per platform ---------------------------------------------------------------------

    def _annotations(self, source_digest: str, ref: ImageRef) -> dict[str, str]:
        return {
            li.ANN_SOURCE_DIGEST: source_digest,
            li.ANN_SOURCE_REF: str(ref),
            li.ANN_MODE: self.options.mode,
            li.ANN_FORMAT_VERSION: str(li.FORMAT_VERSION),
        }

    async def _layers(
        self, repo: str, image: _PlatformImage, mode: Mode, result: ConvertResult
    ) -> list[oci.Descriptor]:
        unique: dict[str, tuple[oci.Descriptor, str]] = {}  # a layer repeated in the image converts once
        for layer, diff_id in zip(image.parsed.layers, image.config.rootfs.diff_ids, strict=True):
            first = unique.setdefault(layer.digest, (layer, diff_id))
            if first[1] != diff_id:
                raise ConversionError(
                    f"layer {layer.digest} appears twice in the image, with diff_ids {first[1]} and {diff_id}"
                )
        tasks = [
            asyncio.ensure_future(self._convert_layer(repo, layer, diff_id, mode, result))
            for layer, diff_id in unique.values()
        ]
        try:
            done = await asyncio.gather(*tasks)
        except BaseException:
            # The first failure fails the image: stop the other layers and wait for them to
            # clean up (their own failures, if any, are not the one to report).
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        converted = dict(zip(unique, done, strict=True))
        out = [converted[layer.digest] for layer in image.parsed.layers]
        result.size_before += sum(layer.size for layer in image.parsed.layers)
        result.size_after += sum(d.size for d in out)
        return out

    async def _index_artifact(self, ref: ImageRef, image: _PlatformImage, result: ConvertResult) -> oci.Descriptor:
        repo = ref.repository
        blobs = await self._layers(repo, image, "index", result)
        await self.client.upload_blob(repo, empty_config().digest, oci.EMPTY_JSON)
        subject = oci.Descriptor(
            mediaType=image.manifest.media_type, digest=image.manifest.digest, size=len(image.manifest.data)
        )
        annotations = self._annotations(image.manifest.digest, ref)
        body = {
            "schemaVersion": 2,
            "mediaType": oci.OCI_MANIFEST,
            "artifactType": li.INDEX_ARTIFACT_TYPE,
            "config": empty_config().wire(),
            "layers": [b.wire() for b in blobs],
            "subject": subject.wire(),
            "annotations": annotations,
        }
        data = oci.canonical_json(body)
        digest = await self.client.put_manifest(repo, oci.sha256_digest(data), data, oci.OCI_MANIFEST)
        desc = oci.Descriptor(
            mediaType=oci.OCI_MANIFEST,
            digest=digest,
            size=len(data),
            artifactType=li.INDEX_ARTIFACT_TYPE,
            annotations=annotations,
        )
        await self.client.add_referrer(repo, image.manifest.digest, desc)
        return desc

    async def _full_manifest(
        self, ref: ImageRef, image: _PlatformImage, result: ConvertResult
    ) -> tuple[oci.Descriptor, bytes]:
        """The pushed full-mode manifest of one platform: its descriptor and its bytes."""
        repo = ref.repository
        layers = await self._layers(repo, image, "full", result)
        config = image.parsed.config.model_copy()
        if config.mediaType == oci.DOCKER_CONFIG:
            config.mediaType = oci.OCI_CONFIG  # same bytes, OCI media type to sit in an OCI manifest
        body = {
            "schemaVersion": 2,
            "mediaType": oci.OCI_MANIFEST,
            "config": config.wire(),
            "layers": [d.wire() for d in layers],
            "annotations": self._annotations(image.manifest.digest, ref),
        }
        data = oci.canonical_json(body)
        digest = await self.client.put_manifest(repo, oci.sha256_digest(data), data, oci.OCI_MANIFEST)
        return oci.Descriptor(mediaType=oci.OCI_MANIFEST, digest=digest, size=len(data), platform=image.platform), data

    # -- the whole image ------------------------------------------------------------------

    async def convert(self, ref: ImageRef) -> ConvertResult:
        try:
            return await self._convert(ref)
        except RegistryError as e:
            raise ConversionError(str(e)) from e
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConversionError(f"{ref}: malformed manifest or index: {where}: {first['msg']}") from e

    async def _convert(self, ref: ImageRef) -> ConvertResult:
        if ref.tag and ref.tag.endswith(self.options.suffix):
            raise NotConvertible(f"{ref}: already carries the suffix {self.options.suffix!r}")
        top, images = await self.resolve(ref)
        # A source named by digest only gets a target named by digest only: no invented tag.
        target_tag = ref.tag + self.options.suffix if ref.tag else None
        target = ref.with_tag(target_tag) if target_tag else ref
        result = ConvertResult(source=ref, target=target, digest="")
        existing = await self._existing(target, top.digest) if target_tag else None
        if existing:
            result.digest, result.up_to_date = existing, True
            return result

        annotations = self._annotations(top.digest, ref)
        if self.options.mode == "index":
            entries: list[oci.Descriptor] = []
            for image in images:
                artifact = await self._index_artifact(ref, image, result)
                entries.append(
                    oci.Descriptor(
                        mediaType=image.manifest.media_type,
                        digest=image.manifest.digest,
                        size=len(image.manifest.data),
                        platform=image.platform,
                    )
                )
                artifact.platform = oci.Platform(architecture="unknown", os="unknown")
                entries.append(artifact)
            data, media_type = _index_bytes(entries, annotations), oci.OCI_INDEX
        else:
            manifests = [await self._full_manifest(ref, image, result) for image in images]
            if top.media_type in oci.INDEX_TYPES:
                data, media_type = _index_bytes([desc for desc, _ in manifests], annotations), oci.OCI_INDEX
            else:
                data, media_type = manifests[0][1], oci.OCI_MANIFEST
        result.digest = await self.client.put_manifest(
            ref.repository, target_tag or oci.sha256_digest(data), data, media_type
        )
        if not target_tag:
            result.target = ref.with_digest(result.digest)
        return result

    async def _existing(self, target: ImageRef, source_digest: str) -> str | None:
        """Digest of an up-to-date accelerated twin already at the target tag."""
        if await self.client.manifest_exists(target.repository, target.reference) is None:
            return None
        m = await self.client.get_manifest(target.repository, target.reference)
        ann = m.json().get("annotations") or {}
        same = (
            ann.get(li.ANN_SOURCE_DIGEST) == source_digest
            and ann.get(li.ANN_MODE) == self.options.mode
            and ann.get(li.ANN_FORMAT_VERSION) == str(li.FORMAT_VERSION)
        )
        return m.digest if same else None


def _check_diff_id(index: li.LayerIndex, diff_id: str) -> None:
    """The layer's uncompressed bytes must be the ones the config names at its position."""
    if index.diff_id != diff_id:
        raise LayerError(
            f"uncompressed content hashes to {index.diff_id}, but the config says {diff_id} "
            "(a corrupt layer, or diff_ids out of order)"
        )


def _index_bytes(manifests: list[oci.Descriptor], annotations: dict[str, str]) -> bytes:
    body = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [m.wire() for m in manifests]}
    return oci.canonical_json({**body, "annotations": annotations})
