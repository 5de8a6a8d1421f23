"""The registry client: OCI distribution API over aiohttp (auth, blobs, ranges, manifests)."""
