"""Errors raised while reading a layer blob; each message names the cause in one line."""


class LayerError(ValueError):
    """The layer blob cannot be indexed or converted (corrupt, truncated, hostile, unsupported)."""


class NotSeekableError(LayerError):
    """The layer is valid but index-only mode cannot seek in it (e.g. one big zstd frame)."""
