"""The conversion pipeline: resolve an image, convert each layer, push the new manifest last."""
