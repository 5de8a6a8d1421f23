"""``imgaccel snapshotter`` (run the node daemon containerd uses as a proxy snapshotter) and
``imgaccel node-config`` (print the containerd config.toml lines that point containerd at it).

Both read the same YAML node configuration (``--config``; embedded defaults without one), with
``--socket``, ``--root`` and ``--cache-dir`` overriding it. A bad configuration is a usage error
(exit 2, one line naming the file and field).
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from imgaccel.snapshotter.config import ConfigError, NodeConfig, containerd_snippet, load_node_config

_path = click.Path(path_type=Path)
config_opt = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                          help="Node configuration YAML (default: built-in defaults).")  # fmt: skip
socket_opt = click.option("--socket", type=_path, help="gRPC unix socket (default /run/imgaccel/snapshotter.sock).")
root_opt = click.option("--root", type=_path, help="Snapshots and metadata directory (default /var/lib/imgaccel).")
cache_opt = click.option("--cache-dir", type=_path, help="Chunk cache directory (default /var/cache/imgaccel).")


def _load(config_path: Path | None, socket: Path | None, root: Path | None, cache_dir: Path | None) -> NodeConfig:
    absolute = [p.absolute() if p is not None else None for p in (socket, root, cache_dir)]
    try:
        return load_node_config(config_path, *absolute)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None


@click.command()
@config_opt
@socket_opt
@root_opt
@cache_opt
def snapshotter(config_path: Path | None, socket: Path | None, root: Path | None, cache_dir: Path | None) -> None:
    """Run the node daemon: containerd's imgaccel snapshotter, until SIGTERM."""
    from imgaccel.snapshotter.daemon import run
    from imgaccel.snapshotter.erofs_layers import ErofsLayers

    config = _load(config_path, socket, root, cache_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("imgaccel").setLevel(config.log_level.upper())
    try:
        run(config, ErofsLayers(config))
    except (OSError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None


@click.command("node-unmount")
@config_opt
@root_opt
def node_unmount(config_path: Path | None, root: Path | None) -> None:
    """Unmount every lazy layer and the FUSE data mount the node daemon left (stop the daemon
    and the containers using them first; a daemon restart needs none of this)."""
    import asyncio

    from imgaccel.snapshotter.erofs_layers import unmount_all

    config = _load(config_path, None, root, None)
    for mountpoint in asyncio.run(unmount_all(config.root)):
        click.echo(f"unmounted {mountpoint}")


@click.command("node-config")
@config_opt
@socket_opt
def node_config(config_path: Path | None, socket: Path | None) -> None:
    """Print the containerd 1.x config.toml lines that make containerd use this node daemon."""
    click.echo(containerd_snippet(_load(config_path, socket, None, None)), nl=False)


if __name__ == "__main__":  # pragma: no cover - ``imgaccel snapshotter`` once registered in main.py
    snapshotter()
