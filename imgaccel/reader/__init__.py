"""Read accelerated images lazily: range reads, verified chunk cache, merged view, FUSE tree, profiles, check."""
