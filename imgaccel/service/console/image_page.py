"""The console's image page (``/ui/images``): an image's accelerated forms and profiles.

``GET /ui/images`` shows a form to type a reference; ``GET /ui/images?ref=HOST/REPO:TAG``
shows, for the source tag (the tag without ``_accelerated`` / ``_containerd_accelerated`` or a
rule's own suffix) and each accelerated tag: present or not, digest, media type, platforms,
layer sizes, index blob or TOC sizes and chunk counts; and each accelerated form's profiles
(label, chunks, bytes needed) with a start-up chart: an inline SVG (no script, no style
attribute: the console's CSP is ``default-src 'self'``) of the cumulative compressed bytes
needed over the chunks in first-read order, with a table of its quartiles as a fallback.

This module owns the route, the reference checks (400: malformed, or a registry that is not
configured, as ``POST /api/v1/jobs``) and the chart's geometry; the registry side is
``service.image_summary`` (bounded reads, timeouts, LRU caches).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from imgaccel.converter.options import DEFAULT_SUFFIX
from imgaccel.formats.sizes import format_size
from imgaccel.pusher.errors import RegistryError
from imgaccel.pusher.reference import ReferenceError, parse_reference
from imgaccel.service.image_summary import ImageSummaries, Kind, ProfileSummary

if TYPE_CHECKING:
    from imgaccel.service.console import Console

MAX_REFERENCE = 512  # characters of a typed reference
WIDTH, HEIGHT = 480, 160  # the chart, in CSS pixels
LEFT, RIGHT, TOP, BOTTOM = 66, 16, 12, 36  # margins around the plot: tick labels, axis title


@dataclass(frozen=True)
class Tick:
    at: float  # x (or y) of the tick in the SVG
    label: str


@dataclass(frozen=True)
class Chart:
    """A profile's start-up series laid out for ``image.html``."""

    line: str  # polyline points: "x,y x,y ..."
    area: str  # the polygon under it
    points: int
    chunks: int
    total: int
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    title: str
    desc: str
    quartiles: list[tuple[int, int, int]]  # (percent, chunks, cumulative bytes) at 0, 25, 50, 75, 100 %
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right: int = WIDTH - RIGHT
    top: int = TOP
    bottom: int = HEIGHT - BOTTOM


def _chunks(n: int) -> str:
    return f"{n} chunk" if n == 1 else f"{n} chunks"


def startup_chart(profile: ProfileSummary) -> Chart:
    """The chart of ``profile``: x = chunks fetched (0..n), y = cumulative compressed bytes."""
    n, total = profile.chunks, profile.needed
    points = profile.points()
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(i: float) -> float:
        return round(LEFT + plot_w * i / max(n, 1), 1)

    def y(v: float) -> float:
        return round(HEIGHT - BOTTOM - plot_h * v / max(total, 1), 1)

    line = " ".join(f"{x(i)},{y(v)}" for i, v in points)
    area = f"{x(0)},{y(0)} {line} {x(n)},{y(0)}"
    xs = sorted({0, n // 2, n}) if n >= 2 else sorted({0, n})
    ys = [0, total / 2, total] if total else [0]
    quarters = profile.quartiles()
    at = ", ".join(
        f"{q}% of the chunks ({i}): {format_size(v)}" for q, (i, v) in zip((25, 50, 75), quarters[1:4], strict=True)
    )
    return Chart(
        line=line,
        area=area,
        points=len(points),
        chunks=n,
        total=total,
        x_ticks=[Tick(x(i), str(i)) for i in xs],
        y_ticks=[Tick(y(v), format_size(v)) for v in ys],
        title=f"{profile.label}: {format_size(total)} needed over {_chunks(n)}",
        desc=(
            f"Cumulative compressed bytes needed at start-up, chunk by chunk in the order the workload "
            f"first read them, rising from 0 to {format_size(total)} ({total} bytes) over {_chunks(n)}. "
            f"After {at}."
        ),
        quartiles=[(q, i, v) for q, (i, v) in zip((0, 25, 50, 75, 100), quarters, strict=True)],
    )


LAYER_TYPE_PREFIXES = ("application/vnd.oci.image.layer.v1.", "application/vnd.docker.image.rootfs.diff.",
                       "application/vnd.imgaccel.layer.v1.")  # fmt: skip


def short_type(media_type: str) -> str:
    """A layer media type without its well-known prefix (``tar+gzip``)."""
    for prefix in LAYER_TYPE_PREFIXES:
        if media_type.startswith(prefix) and len(media_type) > len(prefix):
            return media_type[len(prefix) :]
    return media_type


class ImagePage:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.summaries = ImageSummaries()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/ui/images", self.images)

    def _suffixes(self, repository: str) -> list[tuple[Kind, str]]:
        """The accelerated tags' suffixes: the defaults, then those of rules for ``repository``."""
        out: list[tuple[Kind, str]] = [("index", DEFAULT_SUFFIX["index"]), ("full", DEFAULT_SUFFIX["full"])]
        for rule in self.console.service.config.rules:
            pair: tuple[Kind, str] = (rule.mode, rule.suffix)
            if rule.tag_suffix and fnmatch.fnmatchcase(repository, rule.repository) and pair not in out:
                out.append(pair)
        return out

    async def images(self, request: web.Request) -> web.Response:
        s, holder = await self.console._session_for_get(request)
        text = request.query.get("ref", "").strip()
        status, found = (200, {}) if not text else await self._lookup(text)
        context: dict[str, Any] = {"summary": None, "error": None, **found}
        page = self.console._render("image.html", s, status, page="images", ref=text, chart=startup_chart,
                                    short_type=short_type, **context)  # fmt: skip
        return self.console._finish(page, holder)

    async def _lookup(self, text: str) -> tuple[int, dict[str, Any]]:
        """(status, template context) for a typed reference."""
        if len(text) > MAX_REFERENCE:
            return 400, {"error": f"reference: longer than {MAX_REFERENCE} characters"}
        try:
            ref = parse_reference(text)
        except ReferenceError as e:
            return 400, {"error": f"reference: {e}"}
        service = self.console.service
        registry = service.registry_for(ref.registry)
        if registry is None:
            if service.config.registries:
                return 400, {"error": f"reference: {ref.registry} is not a configured registry"}
            return 400, {"error": f"reference: {ref.registry} is not on loopback (no 'registries:' configured)"}
        try:
            client = await service.clients.get(registry)
        except RegistryError as e:
            return 502, {"error": str(e)}
        summary = await self.summaries.summarize(client, ref, self._suffixes(ref.repository))
        return summary.status, {"summary": summary, "error": summary.error}
