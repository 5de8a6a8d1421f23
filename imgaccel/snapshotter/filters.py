"""containerd's filter language for listing snapshots (the part ``List``/``Walk`` callers use).

A filter is comma-separated selectors that must all match (AND); a list of filters matches when
any one does (OR); an empty list matches everything. A selector is ``fieldpath``,
``fieldpath==value``, ``fieldpath!=value`` or ``fieldpath~=regex``; a bare fieldpath tests that
the field is present. Field paths of a snapshot: ``name``, ``parent``, ``kind`` (``active``,
``view``, ``committed``) and ``labels.<key>``, where a key with characters other than
``[A-Za-z0-9_]`` and dots is quoted: ``labels."containerd.io/snapshot.ref"==sha256:...``.
Values are bare (anything up to a comma or a blank) or quoted with ``"``, ``/`` or ``|``
(backslash escapes as in Go). This mirrors containerd's ``filters`` package (parser.go,
scanner.go, adaptor in snapshots/storage); malformed filters raise ``FilterError``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Operator = Literal["==", "!=", "~=", "present"]
Fields = Callable[[Sequence[str]], str | None]
"""Resolve a field path (``["labels", "a.b"]``) to its value, None when the field is absent."""

_QUOTES = '"/|'
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
_FIELD = re.compile(r"[A-Za-z0-9_]+")


class FilterError(ValueError):
    """A filter that does not parse; the message quotes it and says where and why."""


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    op: Operator
    value: str = ""
    pattern: re.Pattern[str] | None = None

    def matches(self, fields: Fields) -> bool:
        got = fields(self.fieldpath)
        if self.op == "present":
            return got is not None
        if self.op == "==":
            return got == self.value
        if self.op == "!=":
            return got != self.value
        assert self.pattern is not None
        return got is not None and self.pattern.search(got) is not None


@dataclass(frozen=True)
class Filter:
    """Selectors that must all match."""

    selectors: tuple[Selector, ...]

    def matches(self, fields: Fields) -> bool:
        return all(s.matches(fields) for s in self.selectors)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, why: str) -> FilterError:
        return FilterError(f"filter {self.text!r}: {why} at offset {self.pos}")

    def skip_blanks(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_blanks()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def quoted(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        out: list[str] = []
        while True:
            if self.pos >= len(self.text):
                raise self.fail("quoted literal not terminated")
            ch = self.text[self.pos]
            self.pos += 1
            if ch == quote:
                return "".join(out)
            if ch != "\\":
                out.append(ch)
                continue
            if self.pos >= len(self.text):
                raise self.fail("quoted literal not terminated")
            esc = self.text[self.pos]
            self.pos += 1
            if esc == quote:
                out.append(quote)
            elif esc in _ESCAPES:
                out.append(_ESCAPES[esc])
            elif esc in "xuU":
                width = {"x": 2, "u": 4, "U": 8}[esc]
                digits = self.text[self.pos : self.pos + width]
                if len(digits) != width or not all(c in "0123456789abcdefABCDEF" for c in digits):
                    raise self.fail(f"invalid \\{esc} escape")
                out.append(chr(int(digits, 16)))
                self.pos += width
            elif esc in "01234567":
                digits = self.text[self.pos - 1 : self.pos + 2]
                if len(digits) != 3 or not all(c in "01234567" for c in digits):
                    raise self.fail("invalid octal escape")
                out.append(chr(int(digits, 8)))
                self.pos += 2
            else:
                raise self.fail(f"unknown escape \\{esc}")

    def field(self) -> str:
        ch = self.peek()
        if ch and ch in _QUOTES:
            return self.quoted()
        m = _FIELD.match(self.text, self.pos)
        if not m:
            raise self.fail("expected a field name")
        self.pos = m.end()
        return m.group(0)

    def value(self) -> str:
        ch = self.peek()
        if not ch or ch == ",":
            raise self.fail("expected a value")
        if ch in _QUOTES:
            return self.quoted()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] != "," and not self.text[self.pos].isspace():
            self.pos += 1
        return self.text[start : self.pos]

    def selector(self) -> Selector:
        path = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            path.append(self.field())
        ch = self.peek()
        if ch in ("", ","):
            return Selector(tuple(path), "present")
        op = self.text[self.pos : self.pos + 2]
        if op not in ("==", "!=", "~="):
            raise self.fail("expected '==', '!=', '~=', ',' or the end")
        self.pos += 2
        value = self.value()
        if op == "~=":
            try:
                return Selector(tuple(path), "~=", value, re.compile(value))
            except re.error as e:
                raise self.fail(f"bad regular expression {value!r}: {e}") from None
        return Selector(tuple(path), op, value)  # type: ignore[arg-type]  # op is one of the checked three

    def parse(self) -> Filter:
        selectors = [self.selector()]
        while self.peek() == ",":
            self.pos += 1
            selectors.append(self.selector())
        if self.peek():
            raise self.fail("unexpected text")
        return Filter(tuple(selectors))


def parse(text: str) -> Filter:
    """One filter (AND of its selectors); an empty string matches everything."""
    return Filter(()) if not text.strip() else _Parser(text).parse()


def parse_all(texts: Sequence[str]) -> Callable[[Fields], bool]:
    """A predicate true when any of ``texts`` matches (always true for none)."""
    filters = [parse(t) for t in texts]
    if not filters:
        return lambda fields: True
    return lambda fields: any(f.matches(fields) for f in filters)


def snapshot_fields(name: str, parent: str, kind: str, labels: Mapping[str, str]) -> Fields:
    """The field paths of one snapshot, as containerd's snapshot storage adaptor exposes them."""

    def get(path: Sequence[str]) -> str | None:
        if not path:
            return None
        head = path[0]
        if head == "name":
            return name
        if head == "parent":
            return parent
        if head == "kind":
            return kind
        if head == "labels":
            return labels.get(".".join(path[1:])) if labels else None
        return None

    return get
