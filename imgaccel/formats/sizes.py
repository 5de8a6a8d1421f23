"""Byte sizes in configuration files: ``100GB``, ``200GiB``, ``512MiB``, ``4k`` or a plain
number of bytes. Decimal units (kB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB,
GiB, TiB, and a bare k/m/g/t) powers of 1024."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(?:([kmgt])(i?)(b?))?\s*", re.IGNORECASE)
_POWER = {"k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(value: str) -> int:
    """The number of bytes ``value`` names; ValueError."""
    m = _SIZE.fullmatch(value)
    if not m:
        raise ValueError(f"{value!r} is not a size (e.g. 100GB, 200GiB, 512MiB, or a number of bytes)")
    number, unit, binary, b = m.groups()
    if unit is None:
        return int(float(number))
    base = 1000 if (b and not binary) else 1024  # "GB" decimal; "GiB", "G" binary
    return int(float(number) * base ** _POWER[unit.lower()])


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _size_field(value: object) -> object:
    return parse_size(value) if isinstance(value, str) else value  # numbers: left to pydantic


Size = Annotated[int, BeforeValidator(_size_field)]  # a pydantic field taking a size
