"""The cache node: a read-only OCI distribution endpoint inside a cluster that pulls through from
configured upstream registries, keeps what it fetched in a bounded content-addressed store, and
lets only clients that can pull a repository read it (cluster token or their own credentials)."""
