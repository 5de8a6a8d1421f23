"""Pure data: OCI wire types and imgaccel's own index and TOC formats. No I/O."""
