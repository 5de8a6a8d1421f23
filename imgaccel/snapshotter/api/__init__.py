"""Generated protobuf/gRPC modules of the containerd snapshots API (scripts/gen-protos)."""
