"""``imgaccel cachenode``: run a cache node (a pull-through, access-checked blob and manifest
server for the cluster) from its YAML configuration. A bad configuration exits 2 and a data
directory or listen address that cannot be used exits 1, each with one line on stderr."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from imgaccel.cachenode.config import CONFIG_NAME, ConfigError, load_config


@click.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help=f"Cache node configuration YAML (e.g. {CONFIG_NAME}).")  # fmt: skip
@click.option("--listen", help="HOST:PORT to listen on (default: the config's, else 127.0.0.1:5100).")
@click.option("--data-dir", type=click.Path(path_type=Path),
              help="Store directory (default: the config's, else /var/lib/imgaccel-cachenode).")  # fmt: skip
def cachenode(config_path: Path, listen: str | None, data_dir: Path | None) -> None:
    """Serve images to the cluster's nodes, pulling through from the configured registries."""
    from imgaccel.cachenode.server import StartError, serve
    from imgaccel.cli.common import err, fail

    try:
        config = load_config(config_path, listen, data_dir)
    except ConfigError as e:
        fail(str(e))
        sys.exit(2)
    if logging.getLogger().level > logging.INFO:
        logging.getLogger("imgaccel.cachenode").setLevel(logging.INFO)
    try:
        serve(config, on_ready=lambda url: err.print(f"cache node listening on {url}", highlight=False))
    except StartError as e:
        fail(str(e))
        sys.exit(1)
