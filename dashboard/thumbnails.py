"""PNG pictures of a result for the worklist page: a thumbnail and the full summary.

Rendered from what the database and the storage folder hold, with the same code that
draws the Secondary Capture summary image (:mod:`worker.outputs.render`), so the page
shows the picture the PACS receives:

- thumbnail: the coronal overview with the lesion regions in translucent red (no
  text panel: unreadable at that size), at most ``THUMBNAIL_PX`` pixels high;
- summary: the whole summary image (overview + text panel).

A result without a scored series, or whose source instances are gone, gets a plain
placeholder with the reason, so an ``<img>`` always loads. Rendering reads the whole
scored series once (a few seconds for 300 slices), so pictures are cached in memory
by (result id, kind): at most ``CACHE_ENTRIES`` entries, one rendering at a time
(bounded memory). Instance paths come from the database, relative to the storage
folder; one that would leave the folder is refused.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger("ct_triage.dashboard")

THUMBNAIL_PX = 160
CACHE_ENTRIES = 256
PLACEHOLDER_BACKGROUND = (36, 40, 52)
PLACEHOLDER_TEXT = (190, 196, 210)


def placeholder_png(text: str, size: int = THUMBNAIL_PX) -> bytes:
    image = Image.new("RGB", (size, size), PLACEHOLDER_BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    words, lines, line = text.split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) > size - 16 and line:
            lines.append(line)
            line = word
        else:
            line = trial
    lines.append(line)
    y = (size - 17 * len(lines)) // 2
    for text_line in lines[:6]:
        width = draw.textlength(text_line, font=font)
        draw.text(((size - width) / 2, y), text_line, font=font, fill=PLACEHOLDER_TEXT)
        y += 17
    return _png(image)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


class Thumbnails:
    """Renders and caches result pictures; thread-safe."""

    def __init__(self, storage_dir: Path):
        self.storage_dir = Path(storage_dir).resolve()
        self._cache: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._render_lock = threading.Lock()

    def get(self, session_factory, result_id: int | None, kind: str = "thumbnail") -> bytes:
        if kind not in ("thumbnail", "summary"):
            raise ValueError(f"argument 'kind' must be 'thumbnail' or 'summary', got {kind!r}")
        if result_id is None:
            return placeholder_png("not scored yet")
        key = (result_id, kind)
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        with self._render_lock:
            with self._cache_lock:  # rendered by another request while we waited
                if key in self._cache:
                    return self._cache[key]
            png = self._render(session_factory, result_id, kind)
            with self._cache_lock:
                self._cache[key] = png
                while len(self._cache) > CACHE_ENTRIES:
                    self._cache.popitem(last=False)
        return png

    def _render(self, session_factory, result_id: int, kind: str) -> bytes:
        from db.views import summary_source

        with session_factory() as session:
            source = summary_source(session, result_id)
        if source is None:
            return placeholder_png("no result")
        result_json, series_fk, paths = source
        try:
            return self._render_result(json.loads(result_json), paths, kind)
        except Exception as exc:  # any failure becomes a visible placeholder
            log.warning("result %d: no %s picture: %s: %s", result_id, kind, type(exc).__name__,
                        str(exc).splitlines()[0][:200] if str(exc) else "")
            return placeholder_png("no picture: source images unavailable")

    def _render_result(self, data: dict, paths: list[tuple[str, str]], kind: str) -> bytes:
        import numpy as np
        from pydicom import dcmread

        from worker.outputs.render import coronal_overview, orientation_markers, render_summary
        from worker.scoring.result import ScoreResult

        result = ScoreResult.from_json(data)
        if not paths:
            label = {"failed": "scoring failed", "not_applicable": "not applicable"}.get(result.status, "no images")
            return placeholder_png(label)
        by_uid = dict(paths)
        order = [uid for uid in result.source_sop_instance_uids if uid in by_uid] or sorted(by_uid)
        datasets = [dcmread(self._safe_path(by_uid[uid])) for uid in order]
        if kind == "summary":
            return _png(Image.fromarray(render_summary(datasets, result), mode="RGB"))
        boxes = result.boxes if result.status == "scored" else []
        overview = orientation_markers(coronal_overview(datasets, boxes), datasets)
        image = Image.fromarray(np.asarray(overview), mode="RGB")
        image.thumbnail((THUMBNAIL_PX * 2, THUMBNAIL_PX), Image.Resampling.LANCZOS)
        return _png(image)

    def _safe_path(self, relative: str) -> Path:
        path = (self.storage_dir / relative).resolve()
        if not path.is_relative_to(self.storage_dir):
            raise ValueError("instance path leaves the storage folder")
        return path
