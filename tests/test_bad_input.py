"""Bad input: a one-line error naming the object and the cause, exit 1, and no tag pushed."""

from __future__ import annotations

import gzip
import io
import tarfile
import tempfile
from pathlib import Path

import pytest

from fixtures.build_images import Member, real_bytes, tar_bytes
from tests.helpers import run_cli, sha256
from tests.raw_push import push_image
from tests.registry import Registry

GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
WORKDIR = Path(tempfile.mkdtemp(prefix="imgaccel-test-workdirs-"))


def one_line_error(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def assert_fails_cleanly(
    registry: Registry, repo: str, *needles: str, mode: str = "index", args: tuple[str, ...] = ()
) -> str:
    workdir = WORKDIR / repo.replace("/", "_")
    workdir.mkdir(parents=True)
    r = run_cli("convert", f"{registry.host}/{repo}:v1", "--mode", mode, "--workdir", str(workdir), *args)
    assert list(workdir.iterdir()) == [], "temporary files were left behind"
    assert r.code == 1, r.out + r.err
    assert r.out == ""
    line = one_line_error(r.err)
    for n in needles:
        assert n in line, line
    assert "Traceback" not in r.err
    assert registry.tags(repo) == ["v1"], "a tag was pushed for a failed conversion"
    return line


def oversized_entry_tar() -> bytes:
    """A tar whose only entry declares 1 MiB of data but carries 10 KiB."""
    buf = io.BytesIO()
    ti = tarfile.TarInfo("claims-a-lot.bin")
    ti.size = 1 << 20
    ti.mtime = 0
    buf.write(ti.tobuf(tarfile.PAX_FORMAT))
    buf.write(real_bytes(10_240))
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["index", "full"])
def test_declared_size_beyond_stream(registry: Registry, mode: str) -> None:
    blob = gzip.compress(oversized_entry_tar())
    push_image(registry.host, f"bad/oversized-{mode}", "v1", [(GZ, blob)], [sha256(oversized_entry_tar())])
    assert_fails_cleanly(registry, f"bad/oversized-{mode}", sha256(blob), "past the end of the stream", mode=mode)


@pytest.mark.parametrize("mode", ["index", "full"])
def test_truncated_gzip(registry: Registry, mode: str) -> None:
    tar = tar_bytes([Member("f.bin", real_bytes(2 << 20, "libc"))])
    whole = gzip.compress(tar)
    blob = whole[: len(whole) * 2 // 3]
    push_image(registry.host, f"bad/truncated-{mode}", "v1", [(GZ, blob)], [sha256(tar)])
    line = assert_fails_cleanly(registry, f"bad/truncated-{mode}", sha256(blob), mode=mode)
    assert "truncated" in line or "corrupt" in line


def test_digest_mismatch_in_registry(registry: Registry) -> None:
    tar = tar_bytes([Member("x.txt", b"digest mismatch fixture " * 100)])
    blob = gzip.compress(tar)
    push_image(registry.host, "bad/mismatch", "v1", [(GZ, blob)], [sha256(tar)])
    path = registry.blob_path(sha256(blob))
    path.write_bytes(path.read_bytes()[:-4] + b"oops")
    assert_fails_cleanly(registry, "bad/mismatch", sha256(blob), "hash to")


def test_unknown_layer_media_type(registry: Registry) -> None:
    blob = gzip.compress(tar_bytes([Member("x", b"x")]))
    push_image(registry.host, "bad/mediatype", "v1", [("application/vnd.example.layer.v1+foo", blob)])
    assert_fails_cleanly(
        registry, "bad/mediatype", "unsupported layer media type", "application/vnd.example.layer.v1+foo"
    )


def test_helm_chart_is_not_an_image(registry: Registry) -> None:
    chart = gzip.compress(tar_bytes([Member("mychart/Chart.yaml", b"apiVersion: v2\nname: mychart\nversion: 0.1.0\n")]))
    push_image(
        registry.host,
        "bad/helm",
        "v1",
        [("application/vnd.cncf.helm.chart.content.v1.tar+gzip", chart)],
        config_media_type="application/vnd.cncf.helm.config.v1+json",
        config=b'{"name":"mychart","version":"0.1.0"}',
    )
    assert_fails_cleanly(registry, "bad/helm", "not a container image", "application/vnd.cncf.helm.config.v1+json")


def test_blob_is_not_what_media_type_says(registry: Registry) -> None:
    blob = real_bytes(50_000, "libz")
    push_image(registry.host, "bad/notgzip", "v1", [(GZ, blob)], [sha256(blob)])
    assert_fails_cleanly(registry, "bad/notgzip", sha256(blob), "declares gzip")


def test_garbage_inside_tar(registry: Registry) -> None:
    tar = bytearray(tar_bytes([Member("a.txt", b"a" * 600), Member("b.txt", b"b" * 600)]))
    tar[1536:2048] = b"\xff" * 512  # the second header block becomes garbage
    blob = gzip.compress(bytes(tar))
    push_image(registry.host, "bad/garbage", "v1", [(GZ, blob)], [sha256(bytes(tar))])
    assert_fails_cleanly(registry, "bad/garbage", sha256(blob), "invalid tar header")


@pytest.mark.parametrize("mode", ["index", "full"])
def test_hostile_names_stay_inside(registry: Registry, mode: str) -> None:
    """Escaping names and links are indexed as data; the reader never resolves outside."""
    tar = tar_bytes(
        [
            Member("../evil.txt", b"outside\n"),
            Member("/abs/file.txt", b"absolute name, kept inside the root\n"),
            Member("safe/file.txt", b"safe\n"),
            Member("safe/link-out", type=tarfile.SYMTYPE, linkname="../../../../etc/passwd"),
            Member("safe/hard-out", type=tarfile.LNKTYPE, linkname="../../etc/passwd"),
        ]
    )
    blob = gzip.compress(tar)
    repo = f"bad/hostile-{mode}"
    push_image(registry.host, repo, "v1", [(GZ, blob)], [sha256(tar)])
    r = run_cli("convert", f"{registry.host}/{repo}:v1", "--mode", mode)
    assert r.code == 0, r.err
    suffix = "_accelerated" if mode == "index" else "_containerd_accelerated"
    ref = f"{registry.host}/{repo}:v1{suffix}"
    assert run_cli("ls", ref, "/").out.split() == ["abs/", "safe/"]
    assert run_cli("cat", ref, "/abs/file.txt").out == "absolute name, kept inside the root\n"
    r = run_cli("cat", ref, "/safe/link-out")
    assert r.code == 1 and "/etc: no such file" in r.err  # resolved inside the image, which has no /etc
    assert r.raw == b""
    r = run_cli("cat", ref, "/safe/hard-out")
    assert r.code == 1 and "not in its layer" in r.err
    assert run_cli("cat", ref, "/../evil.txt").code == 1
    assert Path("/etc/passwd").exists()  # (the host file that must never be read)


def test_usage_errors_exit_2(registry: Registry) -> None:
    assert run_cli("convert", "not a reference").code == 2
    assert run_cli("convert").code == 2
    assert run_cli("convert", f"{registry.host}/x:v1", "--mode", "sideways").code == 2
    assert run_cli("convert", f"{registry.host}/x:v1", "--span", "lots").code == 2


def test_missing_image(registry: Registry) -> None:
    r = run_cli("convert", f"{registry.host}/nope/nothing:v1")
    assert r.code == 1
    assert "nope/nothing:v1" in one_line_error(r.err) and "404" in r.err
