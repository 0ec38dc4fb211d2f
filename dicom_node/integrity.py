"""Check a received data set before Success: it parses to its end and its Pixel Data is whole.

Why: a scanner that gets Success deletes its copy or marks the study sent. A data
set truncated in its pixels, or with an element length past the end of the file,
must be refused now (with a status the scanner logs), not fail later in the worker.

What is checked (without loading pixel data into memory):
- **Structure** (:func:`walk`): every element of the data set, nested sequences and
  items included, has a length that fits inside the file, undefined lengths close
  with their delimiters, and the walk ends exactly at the end of the file (a few
  trailing padding bytes, under 8, are tolerated as pynetdicom may leave them).
  Nesting deeper than 32 levels (``MAX_DEPTH``) is refused.
- **Pixel Data** (7FE0,0010), native transfer syntaxes: its length equals
  Rows x Columns x SamplesPerPixel x BitsAllocated / 8 x NumberOfFrames (bits
  rounded up to whole bytes for BitsAllocated 1), plus at most one padding byte.
  Encapsulated (compressed) syntaxes: a Basic Offset Table item, then at least as
  many fragment items as frames, then the sequence delimiter; a non-empty offset table has 4 bytes per frame.
- **Deflated** data sets (:func:`inflate_capped`) are inflated streaming, in 1 MiB
  steps, to a temporary file; beyond ``max_bytes`` (CT_TRIAGE_MAX_INSTANCE_MB) the
  inflation stops and the instance is refused with 0xA703.

Failures raise :class:`IntegrityError` with the DIMSE status to answer.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dicom_node import status

MAX_DEPTH = 32
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_TRAILING_SLACK = 8
_INFLATE_STEP = 1 << 20

NATIVE_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                             "1.2.840.10008.1.2.1.99"})
DEFLATED = "1.2.840.10008.1.2.1.99"


class IntegrityError(Exception):
    def __init__(self, reason: str, status_code: int):
        super().__init__(reason)
        self.reason = reason
        self.status_code = status_code


@dataclass
class PixelInfo:
    offset: int
    length: int | None  # None: encapsulated
    fragments: int = 0
    offset_table_bytes: int = 0


def _malformed(reason: str) -> IntegrityError:
    return IntegrityError(reason, status.MALFORMED_DATASET)


class _Walker:
    def __init__(self, fh: BinaryIO, end: int, implicit: bool, little: bool):
        self.fh = fh
        self.end = end
        self.implicit = implicit
        self.e = "<" if little else ">"
        self.pixel: PixelInfo | None = None

    def _read(self, count: int) -> bytes:
        data = self.fh.read(count)
        if len(data) != count:
            raise _malformed(f"data set ends inside an element header at byte {self.fh.tell()}")
        return data

    def _header(self, implicit: bool) -> tuple[int, bytes | None, int]:
        raw = self._read(8)
        group, element = struct.unpack(self.e + "HH", raw[:4])
        tag = (group << 16) | element
        if group == 0xFFFE or implicit:
            (length,) = struct.unpack(self.e + "L", raw[4:])
            return tag, None, length
        vr = raw[4:6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack(self.e + "L", self._read(4))
        else:
            (length,) = struct.unpack(self.e + "H", raw[6:])
        return tag, vr, length

    def _skip(self, tag: int, length: int) -> None:
        position = self.fh.tell()
        if position + length > self.end:
            raise _malformed(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) declares {length} bytes, "
                             f"{position + length - self.end} past the end of the data set")
        self.fh.seek(length, 1)

    def elements(self, limit: int, depth: int, implicit: bool, top: bool) -> None:
        """Walk elements until ``limit`` (defined length) or an item delimiter (limit < 0)."""
        if depth > MAX_DEPTH:
            raise _malformed(f"sequences nested deeper than {MAX_DEPTH}")
        while not self._at_end(limit, top):
            tag, vr, length = self._header(implicit)
            if tag == _ITEM_END:
                if limit >= 0:
                    raise _malformed("item delimiter inside a defined-length item")
                return
            if tag in (_ITEM, _SEQ_END):
                raise _malformed(f"unexpected ({tag >> 16:04X},{tag & 0xFFFF:04X}) among the elements")
            if tag == _PIXEL_DATA and top:
                self._pixel_data(length)
                continue
            if length == _UNDEFINED:
                if vr not in (None, b"SQ", b"UN"):
                    raise _malformed(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) VR {vr!r} with "
                                     "undefined length")
                # PS3.5 6.2.2: UN of undefined length holds implicit VR little endian
                self._sequence(depth + 1, implicit or vr == b"UN")
            elif vr == b"SQ":
                self._defined_sequence(tag, length, depth + 1, implicit)
            else:
                self._skip(tag, length)

    def _at_end(self, limit: int, top: bool) -> bool:
        """At the end of a defined-length item (``limit``) or of the top-level data set, where
        fewer than _TRAILING_SLACK bytes of zero padding may remain (read here)."""
        position = self.fh.tell()
        if limit >= 0 and position >= limit:
            if position > limit:
                raise _malformed("an element runs past the end of its item")
            return True
        if top and self.end - position < _TRAILING_SLACK:
            if self.fh.read(self.end - position).strip(b"\x00"):
                raise _malformed(f"{self.end - position} stray bytes at the end of the data set")
            return True
        return False

    def _defined_sequence(self, tag: int, length: int, depth: int, implicit: bool) -> None:
        start = self.fh.tell()
        end = start + length
        if end > self.end:
            raise _malformed(f"sequence ({tag >> 16:04X},{tag & 0xFFFF:04X}) declares {length} bytes, past "
                             "the end of the data set")
        while self.fh.tell() < end:
            item, _, item_length = self._header(True)
            if item != _ITEM:
                raise _malformed("a sequence holds something other than items")
            self._item(item_length, depth, implicit)
        if self.fh.tell() != end:
            raise _malformed("an item runs past the end of its sequence")

    def _sequence(self, depth: int, implicit: bool) -> None:
        while True:
            tag, _, length = self._header(True)
            if tag == _SEQ_END:
                return
            if tag != _ITEM:
                raise _malformed("an undefined-length sequence holds something other than items")
            self._item(length, depth, implicit)

    def _item(self, length: int, depth: int, implicit: bool) -> None:
        if length == _UNDEFINED:
            self.elements(-1, depth, implicit, top=False)
        else:
            start = self.fh.tell()
            if start + length > self.end:
                raise _malformed(f"item declares {length} bytes, past the end of the data set")
            self.elements(start + length, depth, implicit, top=False)

    def _pixel_data(self, length: int) -> None:
        offset = self.fh.tell()
        if length != _UNDEFINED:
            self.pixel = PixelInfo(offset, length)
            self._skip(_PIXEL_DATA, length)
            return
        info = PixelInfo(offset, None)
        first = True
        while True:
            tag, _, item_length = self._header(True)
            if tag == _SEQ_END:
                break
            if tag != _ITEM or item_length == _UNDEFINED:
                raise _malformed("encapsulated Pixel Data holds something other than defined-length items")
            self._skip(_PIXEL_DATA, item_length)
            if first:
                info.offset_table_bytes = item_length
                first = False
            else:
                info.fragments += 1
        if first:
            raise _malformed("encapsulated Pixel Data has no Basic Offset Table item")
        self.pixel = info


def walk_file(fh: BinaryIO, dataset_offset: int, transfer_syntax_uid: str) -> PixelInfo | None:
    """Walk the data set in ``fh`` (a file, or an in-memory copy: ``io.BytesIO``) from
    ``dataset_offset`` to its end; Pixel Data's place."""
    implicit = transfer_syntax_uid == "1.2.840.10008.1.2"
    little = transfer_syntax_uid != "1.2.840.10008.1.2.2"
    end = fh.seek(0, 2)
    fh.seek(dataset_offset)
    walker = _Walker(fh, end, implicit, little)
    walker.elements(end, 0, implicit, top=True)
    return walker.pixel


def check_pixel_data(pixel: PixelInfo | None, *, native: bool, rows: int | None, columns: int | None,
                     samples: int | None, bits_allocated: int | None, frames: int | None,
                     requires_pixels: bool) -> None:
    if pixel is None:
        if requires_pixels:
            raise IntegrityError("image without Pixel Data", status.PIXEL_DATA_MISMATCH)
        return
    frames = frames or 1
    if frames < 1:
        raise IntegrityError(f"NumberOfFrames {frames} is not positive", status.PIXEL_DATA_MISMATCH)
    if native:
        if not (rows and columns and bits_allocated):
            raise IntegrityError("Pixel Data without Rows, Columns or BitsAllocated", status.PIXEL_DATA_MISMATCH)
        total_bits = rows * columns * (samples or 1) * bits_allocated * frames
        expected = (total_bits + 7) // 8
        if pixel.length not in (expected, expected + 1):
            raise IntegrityError(f"Pixel Data has {pixel.length} bytes; {rows}x{columns}x{samples or 1} samples "
                                 f"x {bits_allocated} bits x {frames} frame(s) imply {expected}",
                                 status.PIXEL_DATA_MISMATCH)
        return
    if pixel.length is not None:
        raise IntegrityError("compressed transfer syntax but Pixel Data is not encapsulated",
                             status.PIXEL_DATA_MISMATCH)
    if pixel.fragments < frames:
        raise IntegrityError(f"encapsulated Pixel Data has {pixel.fragments} fragment(s) for {frames} frame(s)",
                             status.PIXEL_DATA_MISMATCH)
    if pixel.offset_table_bytes not in (0, 4 * frames):
        raise IntegrityError(f"Basic Offset Table of {pixel.offset_table_bytes} bytes for {frames} frame(s)",
                             status.PIXEL_DATA_MISMATCH)


def inflate_capped(source: Path, dataset_offset: int, target: BinaryIO, max_bytes: int,
                   room_left=lambda written: True) -> int:
    """Inflate the deflated data set of ``source`` into ``target``; bytes written.

    Raises IntegrityError 0xA703 beyond ``max_bytes``, 0xC212 for a corrupt stream, and
    0xA700 when ``room_left(written)`` says the disk floor would be crossed.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    written = 0
    next_room_check = 64 * _INFLATE_STEP
    with open(source, "rb") as fh:
        fh.seek(dataset_offset)
        pending = b""
        while True:
            if not pending:
                chunk = fh.read(_INFLATE_STEP)
                if not chunk:
                    break
            else:
                chunk = pending
            try:
                out = inflater.decompress(chunk, _INFLATE_STEP)
            except zlib.error as exc:
                raise _malformed(f"corrupt deflate stream: {exc}") from exc
            pending = inflater.unconsumed_tail
            written += len(out)
            if written > max_bytes:
                raise IntegrityError(f"data set inflates to more than {max_bytes // 2**20} MB "
                                     "(CT_TRIAGE_MAX_INSTANCE_MB)", status.OUT_OF_RESOURCES_TOO_LARGE)
            if written >= next_room_check:
                next_room_check += 64 * _INFLATE_STEP
                if not room_left(written):
                        raise IntegrityError("free disk would drop under the floor while inflating",
                                         status.OUT_OF_RESOURCES_DISK_FLOOR)
            target.write(out)
            if inflater.eof:
                break
        tail = inflater.flush()
        written += len(tail)
        if written > max_bytes:
            raise IntegrityError(f"data set inflates to more than {max_bytes // 2**20} MB "
                                 "(CT_TRIAGE_MAX_INSTANCE_MB)", status.OUT_OF_RESOURCES_TOO_LARGE)
        target.write(tail)
    if not inflater.eof:
        raise _malformed("deflate stream ends early (truncated data set)")
    return written
