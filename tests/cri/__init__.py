"""Generated CRI runtime.v1 ImageService subset for tests (scripts/gen-protos)."""
