"""Push hand-made (often deliberately broken) images with the project's registry client."""

from __future__ import annotations

import asyncio
import json

from imgaccel.formats import oci
from imgaccel.pusher.client import RegistryClient
from tests.helpers import sha256


def push_image(
    host: str,
    repo: str,
    tag: str,
    layers: list[tuple[str, bytes]],
    diff_ids: list[str] | None = None,
    config_media_type: str = oci.OCI_CONFIG,
    config: bytes | None = None,
    size_delta: int = 0,
) -> str:
    """Upload blobs, then the manifest by tag; returns the manifest digest. ``size_delta`` is
    added to every layer descriptor's size (a manifest that lies about its blobs)."""
    if config is None:
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids or []}}
        ).encode()

    async def go() -> str:
        async with RegistryClient(host) as client:
            for _, blob in layers:
                await client.upload_blob(repo, sha256(blob), blob)
            await client.upload_blob(repo, sha256(config), config)
            manifest = {
                "schemaVersion": 2,
                "mediaType": oci.OCI_MANIFEST,
                "config": {"mediaType": config_media_type, "digest": sha256(config), "size": len(config)},
                "layers": [{"mediaType": mt, "digest": sha256(b), "size": len(b) + size_delta} for mt, b in layers],
            }
            data = json.dumps(manifest).encode()
            return await client.put_manifest(repo, tag, data, oci.OCI_MANIFEST)

    return asyncio.run(go())
