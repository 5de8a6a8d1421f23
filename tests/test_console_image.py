"""The console's image page (``/ui/images``) in a real headless Chromium, against a real
``imgaccel serve`` and the real registry: an image converted in index mode by the service and
in full mode by the CLI, with profiles recorded by the project's own reader and pushed as
referrers; the page found from the form shows both forms with their sizes and chunk counts, the
profiles with their labels (one of them markup, shown as text), and start-up charts whose
points and final value match what the test computes itself from the profiles and the indexes.
Errors: a malformed reference (400), an unknown tag (404), a configured registry that is down
(502). Screenshots go to ``$IMGACCEL_TEST_ARTIFACTS`` (else the test's tmp dir)."""

from __future__ import annotations

import asyncio
import html
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from fixtures.build_images import push, unique_image
from imgaccel.formats.layer_index import BLOCK_SIZE
from imgaccel.formats.profile import Profile
from imgaccel.formats.sizes import format_size
from imgaccel.pusher.client import RegistryClient
from imgaccel.pusher.reference import parse_reference
from imgaccel.reader.accelerated_image import AcceleratedImage, open_image
from imgaccel.reader.layer_reader import PREFIX_MARGIN, PREFIX_SLACK
from imgaccel.reader.profiles import build_profile, push_profile
from tests.browser import WHY, By, Page, artifacts_dir, chromium
from tests.helpers import get_bytes, get_json, run_cli, sha256
from tests.registry import Registry, free_port
from tests.service import ServiceProcess, make_service

pytestmark = [pytest.mark.skipif(bool(WHY), reason=WHY or "-"), pytest.mark.timeout(180)]

API_TOKEN = "image-page-api-token-0123"
EVIL_LABEL = "<b>warm</b>&<img src=x onerror=window.pwned=1>"
MAX_POINTS = 500  # what the page promises: at most this many points per chart


@dataclass
class Expected:
    """What the test computes itself, per profile: chunks and compressed bytes a replay needs."""

    label: str
    chunks: int
    needed: int
    partial: int


@dataclass
class Env(Page):
    service: ServiceProcess = field(default=None)  # type: ignore[assignment]
    registry: Registry = field(default=None)  # type: ignore[assignment]
    source: str = ""
    dead: str = ""  # a configured registry nobody listens on
    facts: dict[str, Any] = field(default_factory=dict)


def _needed(image: AcceleratedImage, profile: Profile) -> Expected:
    """Bytes a replay of ``profile`` fetches, from the index alone: each chunk's compressed size;
    for an index-mode gzip chunk read only up to ``upto``, the reader's estimate for the 1 MiB
    blocks covering it (FORMAT.md 5; ``LayerReader``: ratio x 1.25 + 32 KiB, at most the chunk)."""
    total = partial = 0
    for item in profile.chunks:
        index = image.layers[item.layer].index
        c = index.chunks[item.chunk]
        assert c.digest == item.digest
        if item.upto is None or index.encoding != "gzip" or not c.blocks or item.upto >= c.u_size:
            total += c.c_size
            continue
        partial += 1
        want = min(c.u_size, -(-item.upto // BLOCK_SIZE) * BLOCK_SIZE)
        total += min(c.c_size, int(c.c_size * want / c.u_size * PREFIX_MARGIN) + PREFIX_SLACK)
    return Expected(profile.label, len(profile.chunks), total, partial)


async def _record(reference: str, label: str, reads: list[tuple[str, int | None]]) -> tuple[Expected, int]:
    """Read files of the image lazily, push the profile of those reads; (expected figures,
    the image's chunk count)."""
    ref = parse_reference(reference)
    async with RegistryClient(ref.registry) as client:
        image = await open_image(client, ref)
        for path, length in reads:
            await image.read_file(path, 0, length)
        profile = build_profile(image, label)
        await push_profile(client, image, profile)
        return _needed(image, profile), sum(len(layer.index.chunks) for layer in image.layers)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("console-image")
    dead = f"127.0.0.1:{free_port()}"
    service = make_service(work / "service", {
        "workers": 1, "reconcile_interval": 0,
        "registries": [{"endpoint": registry.host}, {"endpoint": dead}],
        "rules": [{"repository": "imagepage/*", "mode": "index"}],
        "api_auth": {"token": {"value": API_TOKEN}},
        "retry": {"attempts": 1, "base_delay": 1, "max_delay": 1, "request_attempts": 2},
    }, token=API_TOKEN).start()  # fmt: skip
    try:
        source = f"{registry.host}/imagepage/app:v1"
        push(unique_image(work, "image-page"), "v1", source)
        # Index mode through the service's API, full mode (4 KiB frames: > 500 chunks) with the CLI.
        status, job = service.api("POST", "/api/v1/jobs", {"reference": source})
        assert status == 202, job
        full = run_cli("convert", source, "--mode", "full", "--chunk-size", "4KiB", "--frame-size", "4KiB")
        assert full.code == 0, full.err
        deadline = time.monotonic() + 90
        while (state := service.api("GET", f"/api/v1/jobs/{job['id']}")[1])["state"] != "succeeded":
            assert state["state"] in ("queued", "running") and time.monotonic() < deadline, state
            time.sleep(0.2)
        facts: dict[str, Any] = {}
        # Two profiles of the index-mode form (the older one is shadowed by the newer, same label):
        # parts of files (chunks read in part) and all of busybox.
        old, _ = asyncio.run(_record(source + "_accelerated", "startup", [("/etc/motd", None)]))
        new, chunks = asyncio.run(_record(source + "_accelerated", "startup",
                                          [("/salt.txt", None), ("/etc/motd", None), ("/bin/busybox", None),
                                           ("/data/big.bin", 200_000)]))  # fmt: skip
        facts["index"] = {"profiles": [new, old], "chunks": chunks}
        hot, chunks = asyncio.run(_record(source + "_containerd_accelerated", EVIL_LABEL,
                                          [("/data/big.bin", None), ("/etc/motd", None)]))  # fmt: skip
        facts["full"] = {"profiles": [hot], "chunks": chunks}
        with chromium() as driver:
            yield Env(driver, service.url, artifacts_dir(work / "screenshots"), service.log_path, service, registry,
                      source, dead, facts)  # fmt: skip
    finally:
        service.stop()


def _registry_facts(env: Env) -> dict[str, int]:
    """Sizes read straight from the registry: the layer, its index blob, the full-mode layer and TOC."""
    host, repo = env.registry.host, "imagepage/app"
    source = get_json(f"http://{host}/v2/{repo}/manifests/v1")
    top = get_json(f"http://{host}/v2/{repo}/manifests/v1_accelerated")
    artifact = next(m for m in top["manifests"] if m.get("artifactType") == "application/vnd.imgaccel.index.v1")
    index_manifest = get_json(f"http://{host}/v2/{repo}/manifests/{artifact['digest']}")
    full = get_json(f"http://{host}/v2/{repo}/manifests/v1_containerd_accelerated")
    (layer,) = source["layers"]
    (index_blob,) = index_manifest["layers"]
    (full_layer,) = full["layers"]
    return {
        "layer": layer["size"],
        "index_blob": index_blob["size"],
        "full_layer": full_layer["size"],
        "toc": int(full_layer["annotations"]["io.imgaccel.toc.size"]),
    }


def _fetch(env: Env, ref: str) -> tuple[int, str, dict[str, str]]:
    """GET the page for ``ref`` with the browser's session (status, HTML, headers)."""
    url = f"{env.service.url}/ui/images?" + urllib.parse.urlencode({"ref": ref})
    req = urllib.request.Request(url)
    req.add_header("Cookie", f"imgaccel_session={env.driver.get_cookie('imgaccel_session')['value']}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def _polyline(svg: Any) -> list[tuple[float, float]]:
    points = svg.find_element(By.CSS_SELECTOR, "polyline.series").get_attribute("points").split()
    return [(float(x), float(y)) for x, y in (p.split(",") for p in points)]


def _check_chart(figure: Any, want: Expected) -> None:
    svg = figure.find_element(By.CSS_SELECTOR, "svg[role=img]")
    points = min(want.chunks + 1, MAX_POINTS)
    assert svg.get_attribute("data-chunks") == str(want.chunks)
    assert svg.get_attribute("data-points") == str(points)
    assert svg.get_attribute("data-total") == str(want.needed)
    line = _polyline(svg)
    assert len(line) == points
    xs, ys = [x for x, _ in line], [y for _, y in line]
    assert xs == sorted(xs) and ys == sorted(ys, reverse=True)  # left to right, never down
    assert line[0] == (66.0, 124.0) and line[-1] == (464.0, 12.0)  # (0, 0 bytes) to (n, everything)
    title = svg.find_element(By.TAG_NAME, "title").get_attribute("textContent")
    over = f"{want.chunks} chunk" + ("s" if want.chunks != 1 else "")
    assert title == f"{want.label}: {format_size(want.needed)} needed over {over}"
    desc = svg.find_element(By.TAG_NAME, "desc").get_attribute("textContent")
    assert f"({want.needed} bytes) over {over}" in desc
    ticks = [t.get_attribute("textContent") for t in svg.find_elements(By.CSS_SELECTOR, "text.tick")]
    assert format_size(want.needed) in ticks and str(want.chunks) in ticks and "0" in ticks
    # The fallback table: the last quartile is the whole profile, to the byte.
    rows = figure.find_elements(By.CSS_SELECTOR, "table.quartiles tbody tr")
    assert len(rows) == 5
    last = rows[-1].find_elements(By.CSS_SELECTOR, "td")
    assert last[0].get_attribute("textContent") == str(want.chunks)
    assert last[2].get_attribute("data-bytes") == str(want.needed)


def test_image_page_forms_profiles_and_charts(env: Env) -> None:
    d = env.driver
    sizes = _registry_facts(env)
    env.login(API_TOKEN)
    env.get("/ui/images")
    label = d.find_element(By.CSS_SELECTOR, "label[for=image-ref]")
    assert label.text == "Image reference"
    box = d.find_element(By.ID, "image-ref")
    assert (
        box.get_attribute("name") == "ref"
        and d.find_element(By.CSS_SELECTOR, "form[role=search]").get_attribute("method") == "get"
    )
    assert d.find_element(By.CSS_SELECTOR, "nav a[aria-current=page]").text == "Images"
    # Asked by an accelerated tag: the page is the source tag's, with every form.
    box.send_keys(env.source + "_containerd_accelerated")
    d.find_element(By.CSS_SELECTOR, "form[role=search] button").click()
    env.until(lambda: d.find_elements(By.ID, "image-name"), 30, "the image's page")
    assert env.text("#image-name") == env.source
    assert "ref=" in d.current_url and not d.find_elements(By.ID, "image-error")
    for kind in ("source", "index", "full"):
        row = d.find_element(By.CSS_SELECTOR, f'#forms tr[data-form="{kind}"]')
        assert row.get_attribute("data-present") == "yes", row.text
    assert "(asked)" in env.text('#forms tr[data-form="full"]')
    assert env.text('#forms tr[data-form="source"] [data-field=total]') == format_size(sizes["layer"])
    assert env.text('#forms tr[data-form="index"] [data-field=index-total]') == format_size(sizes["index_blob"])
    assert env.text('#forms tr[data-form="full"] [data-field=total]') == format_size(sizes["full_layer"])
    assert env.text('#forms tr[data-form="full"] [data-field=index-total]') == format_size(sizes["toc"])

    index_layer = '#form-index table.layers tr[data-layer="0"]'
    assert env.text(f"{index_layer} [data-field=size]") == format_size(sizes["layer"])
    assert d.find_element(By.CSS_SELECTOR, f"{index_layer} [data-field=index]").get_attribute("data-bytes") == str(
        sizes["index_blob"]
    )
    assert env.text(f"{index_layer} [data-field=chunks]") == str(env.facts["index"]["chunks"])
    full_layer = '#form-full table.layers tr[data-layer="0"]'
    assert env.text(f"{full_layer} [data-field=size]") == format_size(sizes["full_layer"])
    assert env.text(f"{full_layer} [data-field=original]") == format_size(sizes["layer"])
    assert d.find_element(By.CSS_SELECTOR, f"{full_layer} [data-field=index]").get_attribute("data-bytes") == str(
        sizes["toc"]
    )
    assert env.text(f"{full_layer} [data-field=chunks]") == str(env.facts["full"]["chunks"])

    for kind in ("index", "full"):
        wanted: list[Expected] = env.facts[kind]["profiles"]
        rows = d.find_elements(By.CSS_SELECTOR, f"#form-{kind} table.profiles tbody tr")
        assert len(rows) == len(wanted), [r.text for r in rows]
        for row, want in zip(rows, wanted, strict=True):  # newest first
            assert row.find_element(By.CSS_SELECTOR, "[data-field=label]").text == want.label
            assert row.find_element(By.CSS_SELECTOR, "[data-field=chunks]").text == str(want.chunks)
            assert row.find_element(By.CSS_SELECTOR, "[data-field=needed]").get_attribute("data-bytes") == str(
                want.needed
            )
        figures = d.find_elements(By.CSS_SELECTOR, f"#form-{kind} figure.startup")
        assert len(figures) == len(wanted)
        for figure, want in zip(figures, wanted, strict=True):
            _check_chart(figure, want)
    index_rows = d.find_elements(By.CSS_SELECTOR, "#form-index table.profiles tbody tr")
    assert "yes" in index_rows[0].text and "newer one" in index_rows[1].text
    newest = env.facts["index"]["profiles"][0]
    assert newest.partial > 0  # the read-in-part path of the bytes-needed figure is exercised
    assert env.facts["full"]["profiles"][0].chunks > MAX_POINTS  # and the downsampling
    # The markup label is text, nothing ran.
    assert d.execute_script("return window.pwned") is None
    assert not d.find_elements(By.CSS_SELECTOR, "#form-full table.profiles b, #form-full figure img")
    caption = env.text("#form-index figure.startup figcaption")
    assert f"{newest.chunks} chunks ({newest.partial} read only in part)" in caption, caption
    env.shot("image")
    # The fallback table opens and reads: the whole profile after 100 % of its chunks.
    hot = env.facts["full"]["profiles"][0]
    chart = d.find_element(By.CSS_SELECTOR, "#form-full figure.startup")
    d.execute_script("arguments[0].scrollIntoView()", chart)
    chart.find_element(By.CSS_SELECTOR, "details summary").click()
    last = chart.find_element(By.CSS_SELECTOR, "table.quartiles tbody tr:last-child").text
    assert last == f"100 % {hot.chunks} {format_size(hot.needed)} {hot.needed:,} bytes", last
    env.shot("image-chart-full")
    d.find_element(By.CSS_SELECTOR, "#form-index figure.startup").screenshot(
        str(env.shots / "console-image-chart-index.png")
    )
    d.execute_script("arguments[0].scrollIntoView()", d.find_element(By.ID, "form-index"))
    env.shot("image-index")

    # An unknown tag: the error, as text, on the page.
    env.get("/ui/images")
    d.find_element(By.ID, "image-ref").send_keys(f"{env.registry.host}/imagepage/app:nope")
    d.find_element(By.CSS_SELECTOR, "form[role=search] button").click()
    env.until(lambda: d.find_elements(By.ID, "image-error"), 30, "the error")
    error = env.text("#image-error")
    assert "imagepage/app: not found" in error and "nope_accelerated" in error, error
    assert d.find_element(By.ID, "image-ref").get_attribute("value").endswith(":nope")  # kept in the form
    env.shot("image-unknown")


def test_image_page_statuses(env: Env) -> None:
    env.login(API_TOKEN)
    status, body, headers = _fetch(env, env.source)
    assert status == 200 and "default-src 'self'" in headers["Content-Security-Policy"]
    assert "<script" not in body.split("</head>", 1)[1]  # the chart is server-rendered SVG
    assert ' style="' not in body  # nothing the CSP would block
    evil = "not a reference <script>window.pwned=1</script>"
    status, body, _ = _fetch(env, evil)
    assert status == 400 and html.escape(evil, quote=False) in body and "<script>window" not in body
    assert 'role="alert"' in body and "reference:" in body
    status, body, _ = _fetch(env, "203.0.113.9:5000/imagepage/app:v1")
    assert status == 400 and "203.0.113.9:5000 is not a configured registry" in body
    status, body, _ = _fetch(env, f"{env.registry.host}/imagepage/app:nope")
    assert status == 404 and "imagepage/app: not found" in body
    # By digest: that image alone, its mode read from its annotations.
    digest = sha256(get_bytes(f"http://{env.registry.host}/v2/imagepage/app/manifests/v1_accelerated"))
    status, body, _ = _fetch(env, f"{env.registry.host}/imagepage/app@{digest}")
    assert status == 200 and "Image by digest" in body and digest in body and "startup" in body
    started = time.monotonic()
    status, body, _ = _fetch(env, f"{env.dead}/imagepage/app:v1")
    assert status == 502 and f"{env.dead}/imagepage/app:v1" in body, body[-2000:]
    assert time.monotonic() - started < 25
    # Without a session: the login page, as for the other pages.
    req = urllib.request.Request(f"{env.service.url}/ui/images?ref=x")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.url.endswith("/ui/login")
