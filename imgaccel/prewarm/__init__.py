"""Prewarm tasks: plan an image set's bytes, fill the cache nodes or hand nodes their work,
and keep each task's live, durable status (run by ``imgaccel serve``)."""
