"""Node side: read accelerated images lazily (range reads, verified chunks, merged view)."""
