"""``imgaccel`` command line: convert, inspect, ls, cat, check; plus serve/jobs and mount/record/prefetch/cache.

Exit codes: 0 success, 1 a conversion/read/check failed (each failure named with its cause on
stderr), 2 usage errors (bad flags, malformed references, invalid config).
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import stat as statmod
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import click

from imgaccel.converter.options import DEFAULT_CACHE_REPO, ConversionLimits, ConvertOptions
from imgaccel.formats import layer_index as li
from imgaccel.formats import oci
from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.reference import ImageRef
from imgaccel.reader.accelerated_image import AcceleratedImage, ImageOpenError, open_image
from imgaccel.reader.merged_view import BrokenHardlink, PathError

if TYPE_CHECKING:  # the conversion pipeline and progress bars are imported by the commands that use them
    from imgaccel.converter.image_converter import ConvertResult

from .cachenode_commands import cachenode
from .common import FAILURES, LimitParam, SizeParam, describe, err, fail, parse_ref, registry_client, run_command
from .mount_commands import cache, mount, prefetch, record, umount
from .node_commands import node, node_config, node_unmount, snapshotter
from .prewarm_commands import prewarm
from .quoting import shell_escape
from .service_commands import jobs, serve


@click.group()
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="imgaccel", message="%(version)s")
def main(verbose: int) -> None:
    """Convert container images into lazy-loading images, and read them lazily."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")


plain_http_opt = click.option("--plain-http", is_flag=True, help="Speak HTTP, not HTTPS, to the registry.")
platform_opt = click.option("--platform", help="os/arch[/variant] to read (default: this machine's).")


@main.command()
@click.argument("refs", nargs=-1)
@click.option("--mode", type=click.Choice(["index", "full"]), default="index", show_default=True)
@click.option("--from-file", type=click.File("r"), help="Read references, one per line, from a file ('-': stdin).")
@click.option("--jobs", type=click.IntRange(1, 64), default=2, show_default=True, help="Images converted at once.")
@click.option("--tag-suffix", help="Suffix of the target tag (default: _accelerated / _containerd_accelerated).")
@click.option(
    "--compression", type=click.Choice(["zstd", "lz4"]), default="zstd", show_default=True, help="Full mode codec."
)
@click.option("--level", type=int, help="Full mode compression level (zstd default 4, lz4 0).")
@click.option("--chunk-size", type=SizeParam(), default="4MiB", show_default=True,
              help="Full mode: big files are split into frames of this size.")  # fmt: skip
@click.option("--frame-size", type=SizeParam(), default="128KiB", show_default=True,
              help="Full mode: small files are grouped into frames of up to this size.")  # fmt: skip
@click.option(
    "--span", type=SizeParam(), default="1MiB", show_default=True, help="Index mode: distance between checkpoints."
)
@click.option("--fallback", type=click.Choice(["none", "full"]), default="none", show_default=True,
              help="Index mode: store a full-mode copy of layers that cannot be indexed.")  # fmt: skip
@click.option("--gzip-threads", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Index mode: threads inflating a gzip layer (2: ~20% faster, ~100 MB more memory).")  # fmt: skip
@click.option("--platform", "platforms", multiple=True, help="Convert only these platforms (repeatable).")
@click.option(
    "--cache-repo",
    default=DEFAULT_CACHE_REPO,
    show_default=True,
    help="Registry repository recording converted layers.",
)
@click.option("--no-cache", is_flag=True, help="Do not look up or record converted layers.")
@click.option("--workdir", type=click.Path(file_okay=False), help="Directory for temporary files.")
@click.option("--limit", "limits", type=LimitParam(), multiple=True,
              help="Change one input limit, e.g. max_header_bytes=4MiB (repeatable; see README).")  # fmt: skip
@plain_http_opt
def convert(refs: tuple[str, ...], mode: str, from_file: Any, jobs: int, tag_suffix: str | None, compression: str,
            level: int | None, chunk_size: int, frame_size: int, span: int, fallback: str, gzip_threads: int,
            platforms: tuple[str, ...], cache_repo: str, no_cache: bool, workdir: str | None,
            limits: tuple[tuple[str, int], ...], plain_http: bool) -> None:  # fmt: skip
    """Convert images; prints 'SOURCE -> TARGET@DIGEST' per image."""
    texts = list(refs)
    if from_file:
        texts += [ln.strip() for ln in from_file if ln.strip() and not ln.lstrip().startswith("#")]
    if not texts:
        raise click.UsageError("give at least one image reference (or --from-file)")
    parsed = [parse_ref(t) for t in texts]
    options = ConvertOptions(
        mode=mode,  # type: ignore[arg-type]
        compression=compression,  # type: ignore[arg-type]
        tag_suffix=tag_suffix,
        span=span,
        chunk_size=chunk_size,
        frame_size=frame_size,
        level=level,
        fallback=fallback,  # type: ignore[arg-type]
        gzip_threads=gzip_threads,
        platforms=platforms,
        cache_repo=None if no_cache else cache_repo,
        workdir=workdir,
        limits=conversion_limits(limits),
    )
    ok = asyncio.run(_convert_all(parsed, options, jobs, plain_http))
    sys.exit(0 if ok else 1)


def conversion_limits(pairs: tuple[tuple[str, int], ...]) -> ConversionLimits:
    try:
        return ConversionLimits(**dict(pairs))
    except ValueError as e:
        raise click.UsageError(f"--limit: {describe(e)}") from None


async def _convert_all(refs: list[ImageRef], options: ConvertOptions, jobs: int, plain_http: bool) -> bool:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from imgaccel.converter.image_converter import ImageConverter
    from imgaccel.converter.image_converter import Progress as ConvertProgress

    slots = asyncio.Semaphore(jobs)
    clients: dict[str, RegistryClient] = {}
    all_ok = True
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        console=err, transient=True, disable=not err.is_terminal,
    ) as bars:  # fmt: skip

        async def one(ref: ImageRef) -> None:
            nonlocal all_ok
            async with slots:
                task = bars.add_task(str(ref), total=None)
                progress = ConvertProgress(
                    on_layer_start=lambda d, size: bars.update(task, total=(bars.tasks[task].total or 0) + size),
                    on_bytes=lambda digest, n: bars.advance(task, n),
                )
                client = clients[ref.registry]
                try:
                    result = await ImageConverter(client, options, progress).convert(ref)
                except FAILURES as e:
                    all_ok = False
                    text = describe(e)
                    fail(text if str(ref) in text else f"{ref}: {text}")
                    return
                except Exception as e:  # a bug: still one line, traceback with -v
                    all_ok = False
                    logging.getLogger(__name__).debug("internal error", exc_info=True)
                    fail(f"{ref}: internal error: {type(e).__name__}: {e} (run with -vv for details)")
                    return
                finally:
                    bars.remove_task(task)
                target = result.target.with_digest(result.digest)
                click.echo(f"{result.source} -> {target}")
                if note := _summary(result):
                    err.print(f"note: {result.source}: {note}", highlight=False, soft_wrap=True)

        try:
            for ref in refs:
                if ref.registry not in clients:
                    clients[ref.registry] = await registry_client(ref, plain_http).__aenter__()
            await asyncio.gather(*(one(r) for r in refs))
        finally:
            for c in clients.values():
                await c.close()
    return all_ok


def _summary(r: ConvertResult) -> str:
    if r.up_to_date:
        return "already converted: nothing to do"
    if r.layers_reused and not r.layers_converted:
        return f"all {r.layers_reused} layers reused: no layer work"
    if r.layers_reused:
        return f"{r.layers_converted} layers converted, {r.layers_reused} reused"
    return ""


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "n/a"


def _with_image(ref_text: str, plain_http: bool, platform: str | None,
                fn: Callable[[AcceleratedImage, RegistryClient], Awaitable[int]]) -> None:  # fmt: skip
    """Open the image (one registry client for the whole command), run ``fn``, exit with its code."""
    ref = parse_ref(ref_text)

    async def go() -> int:
        async with registry_client(ref, plain_http) as client:
            image = await open_image(client, ref, platform)
            return await fn(image, client)

    run_command(ref, go)


_TYPE_CHAR = {"dir": "d", "symlink": "l", "reg": "-", "hardlink": "-", "char": "c", "block": "b", "fifo": "p"}


@main.command()
@click.argument("ref")
@click.argument("path", default="/")
@click.option("-l", "long", is_flag=True, help="Long listing: mode, owner, size, name.")
@plain_http_opt
@platform_opt
def ls(ref: str, path: str, long: bool, plain_http: bool, platform: str | None) -> None:
    """List a directory of the image's merged filesystem. Names are quoted as by GNU
    ``ls --quoting-style=shell-escape``. An entry whose bytes cannot be found (a hardlink to a
    missing target) is listed with size ``?`` and named on stderr; the exit code is then 1."""

    async def go(image: AcceleratedImage, client: RegistryClient) -> int:
        _, node = image.view.lookup(path, True)
        if node.entry.type == "dir":
            children, where = node.children, "/" + path.strip("/")
        else:
            children, where = {path.rstrip("/").rsplit("/", 1)[-1]: node}, ""
        code = 0
        for name in sorted(children):
            child = children[name]
            e = child.entry
            shown = shell_escape(name)
            if not long:
                click.echo(shown + ("/" if e.type == "dir" else ""))
                continue
            size = "0"
            if e.type in ("reg", "hardlink"):
                try:
                    size = str(image.view.data_entry(child).size)
                except PathError as ex:
                    size, code = "?", 1
                    full = posixpath.join(where, name) if where else path
                    why = str(ex)
                    if isinstance(ex, BrokenHardlink):
                        why = f"hardlink target {shell_escape(e.linkname)} {ex.reason}"
                    fail(f"{shell_escape(full)}: {why}")
            mode = _TYPE_CHAR[e.type] + statmod.filemode(e.mode)[1:]
            link = f" -> {shell_escape(e.linkname)}" if e.type == "symlink" else ""
            click.echo(f"{mode} {e.uid:>5} {e.gid:>5} {size:>12} {shown}{link}")
        return code

    _with_image(ref, plain_http, platform, go)


@main.command()
@click.argument("ref")
@click.argument("path")
@plain_http_opt
@platform_opt
def cat(ref: str, path: str, plain_http: bool, platform: str | None) -> None:
    """Write a file of the image to stdout (symlinks followed inside the image)."""

    async def go(image: AcceleratedImage, client: RegistryClient) -> int:
        out = sys.stdout.buffer
        async for block in image.iter_file(path):
            out.write(block)
        out.flush()
        return 0

    _with_image(ref, plain_http, platform, go)


@main.command()
@click.argument("ref")
@plain_http_opt
@platform_opt
def check(ref: str, plain_http: bool, platform: str | None) -> None:
    """Read every entry lazily and compare with a full extraction of the source image."""

    from imgaccel.reader.check import compare, reference_tree

    async def go(image: AcceleratedImage, client: RegistryClient) -> int:
        if not image.source_digest:
            raise ImageOpenError(f"{image.ref}: no source manifest recorded")
        expected = await reference_tree(client, image.ref, image.source_digest)
        problems = await compare(image, expected)
        for p in problems:
            click.echo(p)
        n = len(image.view.walk())
        if problems:
            fail(f"{image.ref}: {len(problems)} difference(s) in {n} entries")
            return 1
        click.echo(f"ok: {n} entries identical to {image.source_digest} ({image.mode} mode, "
                   f"{image.bytes_fetched()} bytes fetched lazily)")  # fmt: skip
        return 0

    _with_image(ref, plain_http, platform, go)


@main.command()
@click.argument("ref")
@plain_http_opt
@platform_opt
def inspect(ref: str, plain_http: bool, platform: str | None) -> None:
    """Show an accelerated image's layers, formats, index sizes and ratios."""

    async def go(image: AcceleratedImage, client: RegistryClient) -> int:
        source_layers: list[oci.Descriptor] = []
        if image.source_digest:
            src = await client.get_manifest(image.ref.repository, image.source_digest)
            source_layers = oci.ImageManifest.model_validate_json(src.data).layers
        click.echo(f"image:    {image.ref}")
        click.echo(f"mode:     {image.mode} (imgaccel format v{li.FORMAT_VERSION})")
        click.echo(f"manifest: {image.manifest_digest}")
        click.echo(f"source:   {image.source_digest}")
        src_total = out_total = 0
        for i, layer in enumerate(image.layers):
            s = source_layers[i] if i < len(source_layers) else None
            src_size = s.size if s else 0
            idx = layer.index
            kind = s.mediaType.rsplit(".", 1)[-1] if s else "?"
            click.echo(f"layer {i}: {s.digest if s else '?'} ({kind}, {src_size} bytes)")
            click.echo(f"  read as {idx.encoding}: {len(idx.chunks)} chunks, {len(idx.entries)} entries, "
                       f"{idx.uncompressed_size} bytes uncompressed")  # fmt: skip
            if image.mode == "index" and layer.blob_digest == (s.digest if s else None):
                out = layer.index_size
                click.echo(f"  index: {out} bytes = {_pct(out, src_size)} of the layer")
            else:
                out = layer.blob_size
                click.echo(f"  converted: {layer.blob_digest} {out} bytes = {_pct(out, src_size)} of the source layer"
                           f" (TOC {layer.index_size} bytes)")  # fmt: skip
            src_total += src_size
            out_total += out
        label = "index" if image.mode == "index" else "converted"
        click.echo(f"total: source {src_total} bytes, {label} {out_total} bytes ({_pct(out_total, src_total)})")
        return 0

    _with_image(ref, plain_http, platform, go)


main.add_command(serve)
main.add_command(jobs)
main.add_command(mount)
main.add_command(umount)
main.add_command(cache)
main.add_command(record)
main.add_command(prefetch)
main.add_command(snapshotter)
main.add_command(node_config)
main.add_command(node_unmount)
main.add_command(node)
main.add_command(cachenode)
main.add_command(prewarm)
node.add_command(node_config, "config")
node.add_command(node_unmount, "unmount")

if __name__ == "__main__":
    main()
