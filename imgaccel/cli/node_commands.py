"""``imgaccel snapshotter`` (run the node daemon containerd uses as a proxy snapshotter),
``imgaccel node status`` (ask it what it is doing), ``imgaccel node-config`` (print the
containerd config.toml lines that point containerd at it) and ``imgaccel node-unmount``.

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
    from imgaccel.snapshotter.memory import limit_arenas

    limit_arenas()

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


@click.command("status")
@config_opt
@root_opt
@click.option("--socket", "status_socket", type=_path, help="The daemon's status socket (default <root>/status.sock).")
@click.option("--json", "as_json", is_flag=True, help="Print the status document (JSON) instead of text.")
def node_status(config_path: Path | None, root: Path | None, status_socket: Path | None, as_json: bool) -> None:
    """Show what the running node daemon does: snapshots, images and layers it serves lazily,
    bytes fetched and cached, profile replays and recordings, FUSE requests and fallbacks."""
    import asyncio

    from imgaccel.snapshotter.status import StatusError, fetch_status, render

    config = _load(config_path, None, root, None)
    path = status_socket.absolute() if status_socket is not None else config.status_path
    try:
        status = asyncio.run(fetch_status(path))
    except StatusError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(status.model_dump_json(indent=2))
    else:
        click.echo("\n".join(render(status)))


@click.group("node")
def node() -> None:
    """The node daemon: status, containerd config, unmounting."""


node.add_command(node_status)


@click.command("node-config")
@config_opt
@socket_opt
def node_config(config_path: Path | None, socket: Path | None) -> None:
    """Print the containerd 1.x config.toml lines that make containerd use this node daemon."""
    click.echo(containerd_snippet(_load(config_path, socket, None, None)), nl=False)


if __name__ == "__main__":  # pragma: no cover - ``imgaccel snapshotter`` once registered in main.py
    snapshotter()
