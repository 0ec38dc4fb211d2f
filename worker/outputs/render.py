"""Burned-in pictures for the Secondary Capture series and ``ct-triage demo``.

Pure functions of (source instances, result): the same inputs give the same pixels
(Pillow's bundled default font, no clock, no randomness), which is what makes a retried
delivery byte-identical.

- :func:`render_slice`: one source slice in the lung window (WL -600 / WW 1500, i.e.
  -1350..150 HU) as 8-bit RGB, a 2-pixel pure red (255, 0, 0) rectangle drawn just
  *outside* each lesion box (so the lesion itself stays visible), and a caption such as
  ``AI COVID-19 triage · CT-2 · 34% · NOT FOR DIAGNOSTIC USE``. Pure red is reserved for
  the boxes: text is white/yellow with a black outline and the image is gray, so any
  (255, 0, 0) pixel is a box border.
- :func:`render_summary`: a coronal overview (mean-intensity projection over the image
  rows, resampled to isotropic millimetres, head at the top) with the lesion boxes'
  extents filled in translucent red, beside a text panel with category, % per lung,
  volumes, routing (``ROUTING``), priority, model and device.
- :func:`render_summary_png`: that summary written as a PNG file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from ct_triage import __version__
from worker.outputs.base import validate_inputs
from worker.scoring.result import ROUTING, LesionBox, ScoreResult

LUNG_WINDOW_CENTER = -600.0
LUNG_WINDOW_WIDTH = 1500.0
BOX_COLOR = (255, 0, 0)
BOX_WIDTH = 2
CAPTION_COLOR = (255, 255, 255)
WARNING_COLOR = (255, 210, 0)
TEXT_COLOR = (235, 235, 235)
PANEL_BACKGROUND = (24, 24, 32)
OVERLAY_ALPHA = 0.55
SUMMARY_SIZE = 512  # longest side of the coronal overview, pixels
PANEL_WIDTH = 460
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
TITLE = "AI COVID-19 triage"
PAPER = "CT-0..4 scale: MosMedData, doi:10.17816/DD46826"

_SEVERITY = {"CT-0": "no signs", "CT-1": "mild", "CT-2": "moderate", "CT-3": "severe", "CT-4": "critical"}


# -- pixel helpers --------------------------------------------------------------------
def hounsfield(ds: Dataset) -> np.ndarray:
    """The slice in HU (float32) from stored values and Rescale Slope/Intercept."""
    if "PixelData" not in ds:
        raise ValueError(f"source instance {ds.get('SOPInstanceUID', '?')} has no Pixel Data")
    arr = ds.pixel_array.astype(np.float32)
    if arr.ndim != 2:
        raise ValueError(f"source instance {ds.get('SOPInstanceUID', '?')} is not a single-frame grayscale image")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return arr * slope + intercept


def window_to_uint8(hu: np.ndarray, center: float = LUNG_WINDOW_CENTER, width: float = LUNG_WINDOW_WIDTH) -> np.ndarray:
    """Linear window ``center ± width/2`` to 0..255 (uint8); lung window by default."""
    lo = center - width / 2.0
    scaled = (np.asarray(hu, dtype=np.float32) - lo) * (255.0 / width)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(gray, dtype=np.uint8)[:, :, None], 3, axis=2)


Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def load_font(size: int) -> Font:
    return ImageFont.load_default(size=max(6, int(size)))


def measure_text(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _top, right, _bottom = draw.textbbox((0, 0), text, font=font)
    return int(math.ceil(right - left))


def wrap_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    words = text.split()
    lines: list[str] = []
    current = ""
    for word in words:
        trial = f"{current} {word}".strip()
        if current and measure_text(draw, trial, font) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    if current:
        lines.append(current)
    return lines or [""]


def format_percent(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 10 or value == 0:
        return f"{value:.0f}%"
    return f"{value:.1f}%"


def _format_ml(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} ml"


def caption_text(result: ScoreResult) -> str:
    """``AI COVID-19 triage · CT-2 · 34% · NOT FOR DIAGNOSTIC USE`` (or the status)."""
    if result.status == "scored":
        middle = f"{result.category} · {format_percent(result.involvement_percent)}"
    elif result.status == "not_applicable":
        middle = "not applicable"
    else:
        middle = "scoring failed"
    return f"{TITLE} · {middle} · {NOT_FOR_DIAGNOSTIC_USE}"


def draw_lesion_boxes(rgb: np.ndarray, boxes: Sequence[LesionBox], *, color=BOX_COLOR,
                      width: int = BOX_WIDTH) -> np.ndarray:
    """Draw a ``width``-pixel rectangle just outside each box (inclusive row/col bounds).

    Works on a copy; pixels outside the image are clipped.
    """
    out = np.array(rgb, dtype=np.uint8, copy=True)
    rows, cols = out.shape[:2]
    for box in boxes:
        r0, r1 = box.row_min - width, box.row_max + width
        c0, c1 = box.col_min - width, box.col_max + width
        for k in range(width):
            top, bottom = r0 + k, r1 - k
            left, right = c0 + k, c1 - k
            cs, ce = max(left, 0), min(right, cols - 1)
            rs, re = max(top, 0), min(bottom, rows - 1)
            if cs <= ce:
                if 0 <= top < rows:
                    out[top, cs : ce + 1] = color
                if 0 <= bottom < rows:
                    out[bottom, cs : ce + 1] = color
            if rs <= re:
                if 0 <= left < cols:
                    out[rs : re + 1, left] = color
                if 0 <= right < cols:
                    out[rs : re + 1, right] = color
    return out


def _draw_caption(image: Image.Image, text: str) -> None:
    """Caption at the top left, white with a black outline; shrinks, then wraps, to fit."""
    draw = ImageDraw.Draw(image)
    cols = image.width
    margin = max(2, cols // 128)
    size = max(8, round(cols / 36))
    font = load_font(size)
    while size > 8 and measure_text(draw, text, font) > cols - 2 * margin:
        size -= 1
        font = load_font(size)
    lines = [text]
    if measure_text(draw, text, font) > cols - 2 * margin:
        head, _, tail = text.rpartition(" · ")
        lines = wrap_text(draw, head, font, cols - 2 * margin) + [tail]
    y = margin
    for line in lines:
        draw.text((margin, y), line, font=font, fill=CAPTION_COLOR, stroke_width=1, stroke_fill=(0, 0, 0))
        y += size + 2


@dataclass(frozen=True)
class CaptionOverlay:
    """A caption rendered once, composited onto many slices of one width.

    Drawn on black (``on_black``) and on white (``on_white``); since Pillow blends the
    text linearly into the background, the caption over any background ``bg`` is
    ``on_black + (on_white - on_black) * bg / 255`` exactly (rounded). Only the
    top ``on_black.shape[0]`` rows carry ink.
    """

    on_black: np.ndarray  # (h, cols, 3) uint8
    on_white: np.ndarray  # (h, cols, 3) uint8

    def composite(self, rgb: np.ndarray) -> np.ndarray:
        h = min(self.on_black.shape[0], rgb.shape[0])
        if h == 0:
            return rgb
        black = self.on_black[:h].astype(np.uint16)
        spread = self.on_white[:h].astype(np.uint16) - black
        bg = rgb[:h].astype(np.uint16)
        rgb[:h] = ((black * 255 + spread * bg + 127) // 255).astype(np.uint8)
        return rgb


def caption_overlay(text: str, cols: int, rows: int | None = None) -> CaptionOverlay:
    """The caption ``text`` for images ``cols`` pixels wide (see :func:`_draw_caption`)."""
    height = rows or max(64, cols // 4)
    layers = []
    for value in (0, 255):
        image = Image.new("RGB", (cols, height), (value, value, value))
        _draw_caption(image, text)
        layers.append(np.asarray(image, dtype=np.uint8))
    black, white = layers
    ink = np.flatnonzero((black != 0).any(axis=(1, 2)) | (white != 255).any(axis=(1, 2)))
    h = int(ink[-1]) + 1 if ink.size else 0
    return CaptionOverlay(on_black=black[:h].copy(), on_white=white[:h].copy())


def render_slice(ds: Dataset, boxes: Sequence[LesionBox], result: ScoreResult, *,
                 overlay: CaptionOverlay | None = None) -> np.ndarray:
    """One source slice as burned-in RGB (rows x cols x 3, uint8), same geometry as ``ds``.

    ``overlay``: the caption pre-rendered for this width (:func:`caption_overlay`);
    built here when not given.
    """
    rgb = gray_to_rgb(window_to_uint8(hounsfield(ds)))
    if overlay is None:
        overlay = caption_overlay(caption_text(result), rgb.shape[1], rgb.shape[0])
    overlay.composite(rgb)
    # boxes last: a box near the top is never hidden by the caption
    return draw_lesion_boxes(rgb, boxes)


# -- summary --------------------------------------------------------------------------
def _positions_along_normal(datasets: Sequence[Dataset]) -> list[float] | None:
    try:
        iop = [float(v) for v in datasets[0].ImageOrientationPatient]
        normal = np.cross(iop[:3], iop[3:])
        return [float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])) for ds in datasets]
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        return None


def _head_is_last(datasets: Sequence[Dataset]) -> bool:
    """True when later instances lie further towards the head (+z in patient space)."""
    try:
        z_first = float(datasets[0].ImagePositionPatient[2])
        z_last = float(datasets[-1].ImagePositionPatient[2])
        return z_last > z_first
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        return False


def _slice_spacing(datasets: Sequence[Dataset]) -> float:
    positions = _positions_along_normal(datasets)
    if positions and len(positions) > 1:
        diffs = np.abs(np.diff(positions))
        diffs = diffs[diffs > 1e-3]
        if diffs.size:
            return float(np.median(diffs))
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = datasets[0].get(keyword)
        if value not in (None, "") and float(value) > 0:
            return float(value)
    return 1.0


def _column_spacing(ds: Dataset) -> float:
    spacing = ds.get("PixelSpacing")
    if spacing and len(spacing) == 2 and float(spacing[1]) > 0:
        return float(spacing[1])
    return 1.0


def coronal_overview(source_datasets: Sequence[Dataset], boxes: Sequence[LesionBox], *,
                     size: int = SUMMARY_SIZE) -> np.ndarray:
    """Mean-intensity projection over rows (anterior-posterior), isotropic, head up; RGB.

    Lesion boxes are projected onto the (slice, column) plane and filled with
    translucent red. The longest side is ``size`` pixels.
    """
    if not source_datasets:
        raise ValueError("argument 'source_datasets' must not be empty")
    cols = int(source_datasets[0].Columns)
    projection = np.empty((len(source_datasets), cols), dtype=np.float32)
    for z, ds in enumerate(source_datasets):
        hu = hounsfield(ds)
        if hu.shape[1] != cols:
            raise ValueError("argument 'source_datasets' mixes images of different widths")
        projection[z] = np.clip(hu, -1024.0, 400.0).mean(axis=0)
    mask = np.zeros(projection.shape, dtype=bool)
    for box in boxes:
        if 0 <= box.slice_index < mask.shape[0]:
            mask[box.slice_index, max(box.col_min, 0) : min(box.col_max, cols - 1) + 1] = True
    if _head_is_last(source_datasets):
        projection = projection[::-1]
        mask = mask[::-1]
    lo, hi = np.percentile(projection, [1.0, 99.5])
    if hi - lo < 1e-3:
        hi = lo + 1.0
    gray = np.clip(np.rint((projection - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)

    height_mm = len(source_datasets) * _slice_spacing(source_datasets)
    width_mm = cols * _column_spacing(source_datasets[0])
    scale = size / max(height_mm, width_mm)
    out_w = max(1, int(round(width_mm * scale)))
    out_h = max(1, int(round(height_mm * scale)))
    gray_img = Image.fromarray(gray, mode="L").resize((out_w, out_h), Image.Resampling.BILINEAR)
    mask_img = Image.fromarray(mask.astype(np.uint8) * 255, mode="L").resize((out_w, out_h), Image.Resampling.NEAREST)
    rgb = gray_to_rgb(np.asarray(gray_img)).astype(np.float32)
    m = np.asarray(mask_img) > 127
    red = np.array(BOX_COLOR, dtype=np.float32)
    rgb[m] = (1.0 - OVERLAY_ALPHA) * rgb[m] + OVERLAY_ALPHA * red
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def summary_lines(result: ScoreResult) -> list[tuple[str, tuple[int, int, int]]]:
    """The text panel as (line, color) pairs; long lines are wrapped when drawn."""
    lines: list[tuple[str, tuple[int, int, int]]] = []
    if result.status == "scored":
        cat = result.category or "?"
        lines.append((f"Category: {cat} ({_SEVERITY.get(cat, '?')})", TEXT_COLOR))
        lines.append((f"Lung involvement: {format_percent(result.involvement_percent)} total", TEXT_COLOR))
        lines.append(
            (f"  right lung {format_percent(result.involvement_percent_right)}, "
             f"left lung {format_percent(result.involvement_percent_left)}", TEXT_COLOR)
        )
        lines.append(
            (f"Lung volume: {_format_ml(result.lung_volume_ml)} (right {_format_ml(result.lung_volume_right_ml)}, "
             f"left {_format_ml(result.lung_volume_left_ml)})", TEXT_COLOR)
        )
        count = result.lesion_count if result.lesion_count is not None else len(result.boxes)
        lines.append((f"Lesion volume: {_format_ml(result.lesion_volume_ml)}, {count} lesion(s)", TEXT_COLOR))
        lines.append((f"Routing: {ROUTING.get(cat, 'n/a')}", TEXT_COLOR))
        lines.append((f"Worklist priority: {result.priority}", TEXT_COLOR))
    else:
        label = "NOT APPLICABLE" if result.status == "not_applicable" else "SCORING FAILED"
        lines.append((f"Status: {label}", WARNING_COLOR))
        lines.append((f"Reason: {result.reason or 'not given'}", TEXT_COLOR))
        lines.append((f"Worklist priority: {result.priority} (not scored: read as usual)", TEXT_COLOR))
    lines.append((f"Model: {result.model} {result.model_version} on {result.device}", TEXT_COLOR))
    lines.append((f"Software: ct-triage {__version__}", TEXT_COLOR))
    lines.append((PAPER, TEXT_COLOR))
    lines.append((NOT_FOR_DIAGNOSTIC_USE, WARNING_COLOR))
    return lines


def _placeholder(size: int, text: str) -> np.ndarray:
    image = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    font = load_font(16)
    y = size // 2 - 20
    for line in wrap_text(draw, text, font, size - 20):
        draw.text((10, y), line, font=font, fill=TEXT_COLOR)
        y += 20
    return np.asarray(image, dtype=np.uint8).copy()


def _row_direction(datasets: Sequence[Dataset]) -> str | None:
    """'L' when image columns run towards the patient's left (the usual), 'R' if reversed."""
    try:
        x = float(datasets[0].ImageOrientationPatient[0])
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    if abs(x) < 0.5:
        return None
    return "L" if x > 0 else "R"


def orientation_markers(overview: np.ndarray, datasets: Sequence[Dataset]) -> np.ndarray:
    """Patient side letters on the overview's left and right edges (radiological view)."""
    right_edge = _row_direction(datasets) if datasets else None
    if right_edge is None:
        return overview
    left_edge = "R" if right_edge == "L" else "L"
    image = Image.fromarray(overview, mode="RGB")
    draw = ImageDraw.Draw(image)
    font = load_font(18)
    width = measure_text(draw, right_edge, font)
    for x, letter in ((6, left_edge), (image.width - width - 6, right_edge)):
        draw.text((x, 4), letter, font=font, fill=CAPTION_COLOR, stroke_width=1, stroke_fill=(0, 0, 0))
    return np.asarray(image, dtype=np.uint8).copy()


def render_summary(source_datasets: Sequence[Dataset], result: ScoreResult) -> np.ndarray:
    """Coronal overview with red lesion regions + text panel, RGB uint8 (H x W x 3)."""
    if result.status == "scored":
        overview = coronal_overview(source_datasets, result.boxes)
    else:
        # A failed/not-applicable series may be anything (no pixels, odd geometry):
        # show what can be shown, never fail the summary because of it.
        try:
            overview = coronal_overview(source_datasets, [])
        except Exception as exc:  # documented fallback, the reason is displayed
            overview = _placeholder(SUMMARY_SIZE, f"No overview: {exc}")
    overview = orientation_markers(overview, source_datasets)
    oh, ow = overview.shape[:2]

    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_font, body_font = load_font(24), load_font(15)
    pad = 14
    wrap_width = PANEL_WIDTH - 2 * pad
    drawn: list[tuple[str, tuple[int, int, int], Font, int]] = [(TITLE, WARNING_COLOR, title_font, 32)]
    for text, color in summary_lines(result):
        indent = "  " if text.startswith("  ") else ""
        for i, part in enumerate(wrap_text(probe, text, body_font, wrap_width)):
            drawn.append(((indent if i == 0 else indent + "  ") + part, color, body_font, 21))
        drawn.append(("", color, body_font, 4))
    panel_h = pad * 2 + sum(step for *_, step in drawn)
    height = max(oh, panel_h)
    canvas = Image.new("RGB", (ow + PANEL_WIDTH, height), PANEL_BACKGROUND)
    canvas.paste(Image.fromarray(overview, mode="RGB"), (0, (height - oh) // 2))
    draw = ImageDraw.Draw(canvas)
    y = pad
    for text, color, font, step in drawn:
        if text:
            draw.text((ow + pad, y), text, font=font, fill=color)
        y += step
    return np.asarray(canvas, dtype=np.uint8).copy()


def render_summary_png(source_datasets: Sequence[Dataset], result: ScoreResult, path: str | os.PathLike) -> Path:
    """Write :func:`render_summary` as a PNG (deterministic bytes); returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"argument 'path' must end in .png, got {str(path)!r}")
    if not isinstance(result, ScoreResult):
        raise TypeError(f"argument 'result' must be a ScoreResult, got {type(result).__name__}")
    datasets = list(source_datasets)
    if result.status == "scored":
        validate_inputs(datasets, result, 1)  # order and boxes must match the result
    pixels = render_summary(datasets, result)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="RGB").save(path, format="PNG", optimize=False)
    return path
