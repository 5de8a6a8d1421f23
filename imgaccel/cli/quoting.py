"""File names made safe to print: GNU ``ls --quoting-style=shell-escape`` quoting.

Names from an image are untrusted: a newline, an escape sequence or an undecodable byte
printed raw can forge output lines or drive the terminal. Names arrive as ``str`` decoded from
the tar's bytes as UTF-8 with ``surrogateescape``, so an undecodable byte is a lone surrogate
U+DC80..U+DCFF here and is printed as its octal escape.
"""

from __future__ import annotations

import string

# Never quoted (gnulib quotearg: harmless in every shell context).
_SAFE = frozenset(string.ascii_letters + string.digits + "%+,-./:@]_")
# Harmless but for one place: "#" and "~" at the start, "{" and "}" as the whole name.
_SAFE_INSIDE = frozenset("#~")
_SAFE_NOT_ALONE = frozenset("{}")
# Mean the same inside C and shell double quotes: a name made of these and "'" is "quoted".
_DOUBLE_QUOTE_OK = _SAFE | frozenset(" '")
_NAMED = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def _printable(ch: str) -> bool:
    return ch.isprintable() and not "\ud800" <= ch <= "\udfff"


def _escaped(ch: str) -> str:
    """``ch`` as it goes inside ``$'...'``: a C escape, else its bytes in octal."""
    if ch in _NAMED:
        return _NAMED[ch]
    return "".join(f"\\{b:03o}" for b in ch.encode("utf-8", "surrogateescape"))


def shell_escape(name: str) -> str:
    """``name`` as GNU ``ls --quoting-style=shell-escape`` prints it: unquoted when plain,
    ``'single quoted'`` (``"double"`` when it holds ``'`` and nothing else special) when it
    holds shell characters, and ``$'\\n'``-style escapes for control characters and bytes that
    are not valid UTF-8: ``a<newline>b`` prints as ``'a'$'\\n''b'``. Printable non-ASCII
    characters stay as they are."""

    def plain(i: int, ch: str) -> bool:
        if ch in _SAFE or (ch in _SAFE_INSIDE and i > 0) or (ch in _SAFE_NOT_ALONE and len(name) > 1):
            return True
        return ord(ch) > 127 and _printable(ch)

    if name and all(plain(i, ch) for i, ch in enumerate(name)):
        return name
    if all(_printable(ch) for ch in name):
        if "'" in name and all(ch in _DOUBLE_QUOTE_OK or (ord(ch) > 127) for ch in name):
            return f'"{name}"'
        return "'" + name.replace("'", "'\\''") + "'"
    out = ["'"]
    escaping = False  # inside a $'...' run
    if "'" in name and not _printable(name[-1]) and _printable(name[0]) and name[0] != "'":
        # GNU's quirk: such a name is quoted twice and the second pass starts as if inside a
        # $'...' run, so it opens with an (empty) ''. Where a control character comes first,
        # coreutils 9.1 then prints a wrong \001 inside '...'; this keeps the correct form.
        out.append("''")
    for ch in name:
        if ch == "'":
            out.append("'\\''")  # closes the $'...' run, if any, just as it closes '...'
            escaping = False
        elif _printable(ch):
            if escaping:
                out.append("''")
                escaping = False
            out.append(ch)
        else:
            if not escaping:
                out.append("'$'")
                escaping = True
            out.append(_escaped(ch))
    out.append("'")
    return "".join(out)
