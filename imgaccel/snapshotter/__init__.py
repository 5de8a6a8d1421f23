"""The node daemon: a containerd remote snapshotter that mounts accelerated layers lazily."""
