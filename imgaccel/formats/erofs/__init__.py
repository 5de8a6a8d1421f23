"""EROFS metadata images of layers: the kernel serves a layer's tree, the tar serves its data.

This package owns the EROFS on-disk format as imgaccel writes it (docs/FORMAT.md section 7):
``ondisk`` holds the kernel's structures and constants, ``tree`` turns a layer's tar entries
into the tree an overlayfs lower layer must show (tar replacement rules, implicit parent
directories, hardlinks, OCI whiteouts as overlayfs whiteouts and opaque directories), and
``writer`` lays that tree out as an image with 512-byte blocks whose regular files are
chunk-based inodes pointing into device 1, the layer's uncompressed tar. Pure data: no I/O,
no mounting (that belongs to the node daemon).

    image = build_erofs_image(layer_index)   # image.data: bytes, image.warnings: list[str]
"""

from imgaccel.formats.erofs.writer import WRITER_VERSION, ErofsImage, build_erofs_image

__all__ = ["WRITER_VERSION", "ErofsImage", "build_erofs_image"]
