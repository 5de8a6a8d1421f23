"""imgaccel: convert container images into lazy-loading images and read them lazily."""

__version__ = "0.1.0"
