"""The merged overlay view: whiteouts, opaque directories, replacement, links inside the root."""

from __future__ import annotations

import pytest

from imgaccel.formats.layer_index import Entry
from imgaccel.reader.merged_view import MergedView, PathError, normalize_path


def d(name: str) -> Entry:
    return Entry(name=name, type="dir", mode=0o755)


def f(name: str, size: int = 1) -> Entry:
    return Entry(name=name, type="reg", size=size, mode=0o644)


def link(name: str, target: str) -> Entry:
    return Entry(name=name, type="symlink", linkname=target)


def paths(view: MergedView) -> list[str]:
    return [p for p, _ in view.walk()]


def test_normalize() -> None:
    assert normalize_path("./a//b/./c/") == "a/b/c"
    assert normalize_path("/abs/x") == "abs/x"
    assert normalize_path("a/../b") == "b"
    assert normalize_path("../x") is None and normalize_path("a/../../x") is None


def test_whiteouts_and_opaque() -> None:
    lower = [d("etc"), f("etc/a"), f("etc/b"), d("opq"), f("opq/x"), d("opq/sub"), f("opq/sub/y"), f("top")]
    upper = [f("etc/.wh.a"), f("opq/.wh..wh..opq"), f("opq/z"), f(".wh.top"), f("etc/c")]
    view = MergedView([lower, upper])
    assert sorted(paths(view)) == ["etc", "etc/b", "etc/c", "opq", "opq/z"]


def test_whiteouts_only_hide_lower_layers() -> None:
    same_layer = [f("dir/.wh.keep"), f("dir/keep")]  # a whiteout does not hide its own layer's entry
    assert "dir/keep" in paths(MergedView([same_layer]))


def test_root_opaque_and_replacements() -> None:
    lower = [d("a"), f("a/1"), f("b")]
    upper = [f(".wh..wh..opq"), f("c")]
    assert sorted(paths(MergedView([lower, upper]))) == ["c"]
    # A file replaces a directory (and its children); a directory over a directory merges.
    view = MergedView([[d("x"), f("x/in"), d("y"), f("y/old")], [f("x"), d("y"), f("y/new")]])
    assert sorted(paths(view)) == ["x", "y", "y/new", "y/old"]


def test_symlinks_resolve_inside_the_root() -> None:
    layer = [
        d("etc"),
        f("etc/passwd"),
        d("bin"),
        link("bin/up", "../../../../etc/passwd"),
        link("bin/abs", "/etc/passwd"),
        link("loop1", "loop2"),
        link("loop2", "loop1"),
        link("dirlink", "etc"),
    ]
    view = MergedView([layer])
    assert view.lookup("bin/up")[0] == "etc/passwd"
    assert view.lookup("bin/abs")[0] == "etc/passwd"
    assert view.lookup("dirlink/passwd")[0] == "etc/passwd"
    assert view.lookup("bin/up", follow=False)[1].entry.type == "symlink"
    with pytest.raises(PathError, match="too many levels"):
        view.lookup("loop1")
    with pytest.raises(PathError, match="no such file"):
        view.lookup("etc/nothing")


def test_hardlinks_read_their_target_in_the_same_layer() -> None:
    view = MergedView([[f("a", 10), Entry(name="b", type="hardlink", linkname="a")], [f(".wh.a")]])
    _, node = view.lookup("b")
    assert view.data_entry(node).name == "a"  # still readable after the name "a" is whited out
    assert "a" not in paths(view)
