"""One sanitiser for text that came from a peer (DICOM attributes, AE titles, error messages).

Why: a scanner (or anyone who can open a socket) controls the bytes of Modality,
SeriesDescription, the calling AE title, even the text of a pydicom exception about
its data. Written verbatim, a CR/LF forges a log line or a row in ``ct-triage status``,
ANSI escapes repaint a terminal, and a 64 KiB value floods a log. Every place where
such text reaches a log, ``status``, HL7 or a page goes through :func:`clean`.

Rules (thresholds):
- control characters (C0, DEL, C1, and the Unicode line/paragraph separators) are
  escaped as ``\\xNN`` / ``\\uNNNN``; a backslash is kept (DICOM multi-value separator);
- the result is at most ``limit`` characters (default 200, :data:`DEFAULT_LIMIT`),
  cut with a trailing ``…`` so a reader sees it was shortened;
- ``None`` becomes ``"?"`` (or ``none=`` what the caller wants); bytes are decoded as
  latin-1 first, so every byte is accounted for.

:func:`dicom_text` turns a (possibly multi-valued) element value into the text DICOM
writes, values separated by ``\\``: what the database stores.

HL7 needs its own delimiter escaping on top of this (``|^~\\&``): that belongs to the
HL7 encoder, which should call :func:`clean` first.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

DEFAULT_LIMIT = 200

# C0 controls, DEL, C1 controls, and U+2028/U+2029 (line/paragraph separators), U+FEFF, bidi overrides
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(value: object, limit: int = DEFAULT_LIMIT, *, none: str = "?") -> str:
    """``value`` as one printable line of at most ``limit`` characters."""
    if value is None:
        return none
    text = bytes(value).decode("latin-1") if isinstance(value, (bytes, bytearray, memoryview)) else str(value)
    if len(text) > 4 * limit:  # do not escape megabytes only to cut them
        text = text[: 4 * limit]
    text = _UNSAFE.sub(_escape, text)
    if len(text) > limit:
        text = text[: max(limit - 1, 0)] + "…"
    return text


def dicom_text(value: object) -> str:
    """A DICOM text value as DICOM writes it: the values of a multi-valued element (pydicom's
    ``MultiValue``, a list or tuple) joined with ``\\`` (``A^B\\C^D``), never Python's list
    text (``['A^B', 'C^D']``); a single value (str, PersonName, number) as ``str()``."""
    if isinstance(value, (list, tuple)) or (
            isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))):
        return "\\".join("" if v is None else str(v) for v in value)
    return str(value)


def clean_exception(exc: BaseException, limit: int = DEFAULT_LIMIT) -> str:
    """``Type: message`` of an exception on one line (messages often quote peer data)."""
    return clean(f"{type(exc).__name__}: {exc}", limit)


class OneLineLogFilter:
    """A ``logging`` filter that keeps every record on one line.

    The message is escaped with :func:`clean` (limit 2,000 characters), whatever the
    code that logged it did; a record from pynetdicom with a traceback keeps only the
    exception's type and message unless ``tracebacks`` (ct-triage at DEBUG).

    A record logged with ``extra={"multiline": True}`` (our own blocks, such as the
    settings at start) keeps its line breaks: each line is cleaned on its own and every
    line after the first is indented, so no line of it can pass for a record of its own.
    """

    MESSAGE_LIMIT = 2000

    def __init__(self, tracebacks: bool = False):
        self.tracebacks = tracebacks

    def filter(self, record) -> bool:
        try:
            message = record.getMessage()
        except Exception as exc:
            message = f"{record.msg!r} (unformattable: {exc})"
        if record.exc_info and not self.tracebacks and record.name.startswith("pynetdicom"):
            error = record.exc_info[1]
            if error is not None and clean_exception(error) not in message:
                message = f"{message}: {clean_exception(error)}"
            record.exc_info = None
            record.exc_text = None
        record.msg = (multiline_block(message, self.MESSAGE_LIMIT) if getattr(record, "multiline", False)
                      else clean(message, self.MESSAGE_LIMIT))
        record.args = ()
        return True


def multiline_block(text: str, limit: int = 2000, indent: str = "    ") -> str:
    """``text`` with its line breaks kept: each line cleaned (at most ``limit`` characters),
    the lines after the first indented by ``indent``; at most 200 lines."""
    lines = text.split("\n")
    cut = len(lines) > 200
    out = [clean(line, limit) for line in lines[:200]] + (["…"] if cut else [])
    return out[0] + "".join(f"\n{indent}{line.lstrip()}" for line in out[1:])
