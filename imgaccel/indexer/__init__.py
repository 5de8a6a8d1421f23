"""Builds seekable indexes and full-mode encodings from a layer blob on local disk."""
