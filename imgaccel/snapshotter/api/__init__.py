"""Generated protobuf/gRPC modules: the containerd snapshots API and the CRI ImageService (scripts/gen-protos)."""
