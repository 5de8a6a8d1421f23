"""The merged root filesystem of an image: layers stacked with overlay whiteouts applied.

Entries are placed by their *normalized* path (``normalize_path``): leading ``/`` and ``.``
components dropped and ``..`` resolved lexically; an entry whose name climbs above the root is
left out of the view (it stays in the index as data, but nothing can reach it). Per the OCI
image spec, ``.wh.NAME`` deletes NAME from lower layers and ``.wh..wh..opq`` hides everything
lower layers put in its directory. Symlinks are resolved inside the image root only.
A hardlink's bytes are those of the regular file it names in its own layer, following links
to links (at most ``MAX_HARDLINK_HOPS``); a hardlink whose target is missing, climbs above the
root, is not a regular file or loops raises ``BrokenHardlink`` for that entry alone.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
from dataclasses import dataclass, field

from imgaccel.formats.layer_index import Entry

log = logging.getLogger(__name__)
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
MAX_SYMLINK_HOPS = 40
MAX_HARDLINK_HOPS = 40


def normalize_path(name: str) -> str | None:
    """Path relative to the root ("" is the root itself), or None when it escapes the root."""
    stripped = name.strip("/")
    if "//" not in stripped and "/." not in "/" + stripped:
        return stripped  # the common case: nothing to resolve
    parts: list[str] = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if not parts:
                return None
            parts.pop()
            continue
        parts.append(p)
    return "/".join(parts)


@dataclass
class Node:
    entry: Entry
    layer: int  # which layer the entry comes from (-1: implied directory)
    children: dict[str, Node] = field(default_factory=dict)


class PathError(OSError):
    """A path that does not exist, is not a directory, or loops."""


class BrokenHardlink(PathError):
    """A hardlink entry whose bytes cannot be found: ``reason`` says why (no entry names the
    target in its layer, the target climbs above the root, is not a regular file, or the chain
    of links loops)."""

    def __init__(self, layer: int, entry: Entry, reason: str) -> None:
        super().__init__(f"{entry.name!r}: hardlink target {entry.linkname!r} {reason}")
        self.layer, self.entry, self.reason = layer, entry, reason


def _implied_dir(name: str) -> Entry:
    return Entry(name=name, type="dir", mode=0o755)


class MergedView:
    def __init__(self, layers: list[list[Entry]]) -> None:
        self.root = Node(_implied_dir(""), -1)
        # Per layer: normalized path -> the layer's last entry of that name (hardlink targets
        # resolve here, as a tar extractor links to what it extracted last under that name).
        self.layer_files: list[dict[str, Entry]] = []
        self.ignored: list[str] = []  # entry names that escape the root
        for i, entries in enumerate(layers):
            self._apply_layer(i, entries)

    def _apply_layer(self, i: int, entries: list[Entry]) -> None:
        placed: list[tuple[str, Entry]] = []
        files: dict[str, Entry] = {}
        for e in entries:
            path = normalize_path(e.name)
            if path is None:
                self.ignored.append(e.name)
                log.warning("layer %d: entry %r escapes the root; ignored", i, e.name)
                continue
            placed.append((path, e))
            files[path] = e
        self.layer_files.append(files)
        # Whiteouts act on lower layers only: apply them before this layer's entries.
        for path, _ in placed:
            parent_path, _, base = path.rpartition("/")
            if base == OPAQUE_MARKER:
                node = self._find(parent_path)
                if node is not None and node.entry.type == "dir":
                    node.children.clear()
            elif base.startswith(WHITEOUT_PREFIX):
                node = self._find(parent_path)
                if node is not None:
                    node.children.pop(base[len(WHITEOUT_PREFIX) :], None)
        parents: dict[str, Node] = {}  # directory nodes found so far (tar entries come grouped by directory)
        for path, e in placed:
            parent_path, _, base = path.rpartition("/")
            if base.startswith(WHITEOUT_PREFIX):
                continue
            if path == "":
                if e.type == "dir":
                    self.root.entry, self.root.layer = e, i
                continue
            parent = parents.get(parent_path)
            if parent is None:
                parent = parents[parent_path] = self._ensure_dir(parent_path, i)
            old = parent.children.get(base)
            if old is not None and old.entry.type == "dir" and e.type == "dir":
                old.entry, old.layer = e, i  # directories merge; the upper one's metadata wins
            else:
                if old is not None and old.entry.type == "dir":
                    parents.clear()  # a directory was replaced: nodes found under it are gone
                parent.children[base] = Node(e, i)

    @classmethod
    def overlay_layer(cls, i: int, entries: list[Entry]) -> MergedView:
        """Layer ``i`` alone, its whiteouts in overlayfs form (a 0/0 character device for
        ``.wh.NAME``, the ``trusted.overlay.opaque`` xattr for ``.wh..wh..opq``), so an
        overlay mount can stack the layer directories."""
        opaque = {"trusted.overlay.opaque": base64.b64encode(b"y").decode()}
        dirs: dict[str, Entry] = {}
        out: list[Entry] = []
        opaque_dirs: list[str] = []
        for e in entries:
            path = normalize_path(e.name)
            base = (path or "").rpartition("/")[2]
            if path is not None and base == OPAQUE_MARKER:
                opaque_dirs.append(path.rpartition("/")[0])
            elif path is not None and base.startswith(WHITEOUT_PREFIX):
                parent = path.rpartition("/")[0]
                name = f"{parent}/{base[len(WHITEOUT_PREFIX) :]}" if parent else base[len(WHITEOUT_PREFIX) :]
                out.append(Entry(name=name, type="char", mode=0, mtime=e.mtime))
            else:
                out.append(e)
                if e.type == "dir" and path is not None:
                    dirs[path] = e
        for d in opaque_dirs:
            base_entry = dirs.get(d) or Entry(name=d, type="dir", mode=0o755)
            marked = dataclasses.replace(base_entry, xattrs={**base_entry.xattrs, **opaque})
            out = [marked if x is base_entry else x for x in out] if d in dirs else [*out, marked]
        return cls([[] for _ in range(i)] + [out])

    def find(self, path: str) -> Node | None:
        """The node at exactly ``path`` (normalized; no symlink followed), or None."""
        return self._find(path)

    def _find(self, path: str) -> Node | None:
        node = self.root
        for part in path.split("/") if path else []:
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def _ensure_dir(self, path: str, layer: int) -> Node:
        node = self.root
        for part in path.split("/") if path else []:
            child = node.children.get(part)
            if child is None or child.entry.type != "dir":
                child = Node(_implied_dir(part), layer)
                node.children[part] = child
            node = child
        return node

    def lookup(self, path: str, follow: bool = True) -> tuple[str, Node]:
        """Resolve ``path`` inside the root; returns the resolved path and its node."""
        return self._resolve(path, follow, 0)

    def _resolve(self, path: str, follow_last: bool, hops: int) -> tuple[str, Node]:
        parts = [p for p in path.split("/") if p not in ("", ".")]
        resolved: list[str] = []
        node = self.root
        i = 0
        while i < len(parts):
            part = parts[i]
            i += 1
            if part == "..":
                if resolved:
                    resolved.pop()
                node = self._find("/".join(resolved)) or self.root
                continue
            if node.entry.type != "dir":
                raise PathError(f"/{'/'.join(resolved)}: not a directory")
            child = node.children.get(part)
            if child is None:
                raise PathError(f"/{'/'.join([*resolved, part])}: no such file or directory")
            last = i == len(parts)
            if child.entry.type == "symlink" and (follow_last or not last):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise PathError(f"{path}: too many levels of symbolic links")
                target = child.entry.linkname
                base = [] if target.startswith("/") else resolved
                rest = parts[i:]
                parts = [*base, *[p for p in target.split("/") if p not in ("", ".")], *rest]
                resolved, node, i = [], self.root, 0
                continue
            resolved.append(part)
            node = child
        return "/".join(resolved), node

    def data_entry(self, node: Node) -> Entry:
        """The regular-file entry holding a node's bytes (follows hardlinks, and hardlinks to
        hardlinks, in its layer). Raises ``BrokenHardlink`` when there is none."""
        e = node.entry
        if e.type == "reg":
            return e
        if e.type != "hardlink":
            raise PathError(f"{e.name!r}: not a regular file")
        files = self.layer_files[node.layer] if 0 <= node.layer < len(self.layer_files) else {}
        seen: set[str] = set()
        while e.type == "hardlink":
            target = normalize_path(e.linkname)
            if target is None:
                raise BrokenHardlink(node.layer, node.entry, "is not in its layer (it climbs above the root)")
            if target in seen or len(seen) >= MAX_HARDLINK_HOPS:
                raise BrokenHardlink(node.layer, node.entry, "is part of a loop of hardlinks")
            seen.add(target)
            found = files.get(target)
            if found is None:
                raise BrokenHardlink(node.layer, node.entry, "is not in its layer")
            e = found
        if e.type != "reg":
            raise BrokenHardlink(node.layer, node.entry, f"is not a regular file (it is a {e.type})")
        return e

    def walk(self) -> list[tuple[str, Node]]:
        """Every path in the merged tree (parents before children), root excluded."""
        out: list[tuple[str, Node]] = []
        stack = [("", self.root)]
        while stack:
            path, node = stack.pop()
            for name in sorted(node.children, reverse=True):
                child = node.children[name]
                p = f"{path}/{name}" if path else name
                out.append((p, child))
                if child.entry.type == "dir":
                    stack.append((p, child))
        return out
