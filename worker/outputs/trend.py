"""The follow-up band of the SC summary image: "Change since <date>" and a trend plot.

:func:`with_comparison` appends a band below the summary (``render.render_summary``; called by
``sc.py`` on the summary it stores, and by :func:`render_summary_png` for files)
when the result carries a comparison with priors (``ScoreResult.comparison``, written by
``worker.followup.comparison.apply_assessment``); without one the summary is returned unchanged.

- Left: the text block: the headline prior's date and the interval, total and per-lung
  involvement then -> now (points and relative change), lesion volume change, rate in
  points per day, the trend ("PROGRESSION" in orange when the rule fired, with the rule),
  what differs between the acquisitions (scanner, kernel, slice thickness) and where the
  times came from.
- Right: involvement (%) over acquisition time for every compared study and the current
  one: total (white), right lung (cyan), left lung (green); dotted guides at the
  CT-1/2/3/4 boundaries 25/50/75 %; the date (YYYY-MM-DD) under each point, always under
  the first and the last (labels that would overlap in between are left out); the current
  point is drawn larger.

Deterministic like the rest of the summary (Pillow's default font, no clock); no pure red
(255, 0, 0), which stays reserved for lesion boxes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from worker.followup.comparison import Assessment, trend_points
from worker.outputs.render import PANEL_BACKGROUND, TEXT_COLOR, WARNING_COLOR, load_font, measure_text, wrap_text

BAND_HEIGHT = 312
PLOT_WIDTH = 440
PLOT_MARGIN = dict(left=44, right=16, top=30, bottom=50)
TOTAL_COLOR = (245, 245, 245)
RIGHT_COLOR = (0, 200, 255)
LEFT_COLOR = (90, 220, 90)
PROGRESSION_COLOR = (255, 140, 0)
GUIDE_COLOR = (90, 90, 110)
AXIS_COLOR = (160, 160, 170)
DATE_FORMAT = "%Y-%m-%d"
LABEL_SIZE = 13
TITLE_SIZE = 18
BODY_SIZE = 14


def label_font():
    """The font of the date labels (tests render the expected text with it)."""
    return load_font(LABEL_SIZE)


def title_font():
    return load_font(TITLE_SIZE)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


def _delta(then: float | None, now: float | None, points: float | None, relative: float | None) -> str:
    if points is None:
        return f"{_pct(then)} -> {_pct(now)}"
    rel = f", {relative:+.0f}%" if relative is not None else ""
    return f"{_pct(then)} -> {_pct(now)} ({points:+.1f} points{rel})"


def title_text(assessment: Assessment) -> str:
    """``Change since 2026-11-27 09:30 (36 h)``."""
    h = assessment.headline
    when = h.prior.acquired_at.strftime("%Y-%m-%d %H:%M") if h.prior.acquired_at else "an earlier study"
    hours = f" ({h.hours:.0f} h)" if h.hours is not None else " (interval unknown)"
    return f"Change since {when}{hours}"


def change_lines(assessment: Assessment) -> list[tuple[str, tuple[int, int, int]]]:
    h, now, then = assessment.headline, assessment.current, assessment.headline.prior
    lines = [
        (f"Total: {_delta(then.involvement_percent, now.involvement_percent, h.delta_points, h.relative_percent)}",
         TEXT_COLOR),
        ("Right lung: " + _delta(then.involvement_percent_right, now.involvement_percent_right,
                                 h.delta_points_right, h.relative_percent_right), TEXT_COLOR),
        ("Left lung: " + _delta(then.involvement_percent_left, now.involvement_percent_left,
                                h.delta_points_left, h.relative_percent_left), TEXT_COLOR),
    ]
    volume = f"{h.delta_lesion_ml:+.0f} ml" if h.delta_lesion_ml is not None else "n/a"
    rate = f"{h.points_per_day:+.1f} points/day" if h.points_per_day is not None else "n/a"
    lines.append((f"Lesion volume {volume}; rate {rate}", TEXT_COLOR))
    if assessment.progression:
        lines.append((f"PROGRESSION: category at least CT-3 (from {assessment.category_from_percent} by the "
                      f"share), priority HIGH; rule {assessment.rule.describe()} (MosMedData Table 2)",
                      PROGRESSION_COLOR))
    else:
        lines.append((f"Trend: {h.trend}; category from the current share alone", TEXT_COLOR))
    if h.differences:
        lines.append(("Differs: " + "; ".join(h.differences), WARNING_COLOR))
    else:
        lines.append(("Same scanner, kernel and slice thickness", TEXT_COLOR))
    lines.append((f"Priors compared: {len(assessment.changes)}; times from {now.time_source}", TEXT_COLOR))
    return lines


def _parse(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def draw_trend_plot(points: list[dict], width: int = PLOT_WIDTH, height: int = BAND_HEIGHT) -> Image.Image:
    """Involvement over time, per lung and total, as an RGB image ``width`` x ``height``."""
    image = Image.new("RGB", (width, height), PANEL_BACKGROUND)
    draw = ImageDraw.Draw(image)
    m = PLOT_MARGIN
    x0, x1, y0, y1 = m["left"], width - m["right"], m["top"], height - m["bottom"]
    draw.text((x0, 6), "Involvement over time (%)", font=load_font(BODY_SIZE), fill=TEXT_COLOR)
    timed: list[tuple[dict, dt.datetime]] = []
    for point in points:
        when = _parse(point["acquired_at"])
        if when is not None:
            timed.append((point, when))
    if len(timed) < 2:
        draw.text((x0, (y0 + y1) // 2), "acquisition times unknown", font=label_font(), fill=TEXT_COLOR)
        return image
    values = [v for p, _ in timed for v in (p["total"], p["left"], p["right"]) if v is not None]
    top = min(100.0, max(10.0, float(np.ceil((max(values) + 5) / 10.0) * 10)))
    start, end = timed[0][1], timed[-1][1]
    span = max((end - start).total_seconds(), 1.0)

    def xy(t: dt.datetime, v: float) -> tuple[int, int]:
        return (round(x0 + 8 + (x1 - x0 - 16) * (t - start).total_seconds() / span),
                round(y1 - (y1 - y0) * v / top))

    font = label_font()
    _draw_axes(draw, xy, start, top, (x0, y0, x1, y1), font)
    _draw_series(draw, timed, xy)
    _draw_dates(draw, timed, xy, y1, width, font)
    _draw_legend(draw, x0, y1 + 8 + LABEL_SIZE + 5, font)
    return image


#: (time, involvement %) -> pixel of the plot (defined per plot by :func:`draw_trend_plot`).
_ToPixel = Callable[[dt.datetime, float], tuple[int, int]]


def _draw_axes(draw: ImageDraw.ImageDraw, xy: _ToPixel, start: dt.datetime, top: float,
               box: tuple[int, int, int, int], font) -> None:
    """Dotted CT-1/2/3/4 guides below ``top``, the percent ticks and the L-shaped axes."""
    x0, y0, x1, y1 = box
    for guide in (25, 50, 75):
        if guide < top:
            y = xy(start, guide)[1]
            for x in range(x0, x1, 6):
                draw.line([(x, y), (x + 2, y)], fill=GUIDE_COLOR)
    for tick in range(0, int(top) + 1, 25 if top > 50 else 10):
        y = xy(start, tick)[1]
        label = f"{tick}"
        x = x0 - 6 - measure_text(draw, label, font)
        draw.text((x, y - LABEL_SIZE // 2 - 1), label, font=font, fill=AXIS_COLOR)
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill=AXIS_COLOR, width=1)


def _draw_series(draw: ImageDraw.ImageDraw, timed: list[tuple[dict, dt.datetime]], xy: _ToPixel) -> None:
    """Right lung, left lung and total: a line through the known values, a dot on each (larger: current)."""
    for key, color in (("right", RIGHT_COLOR), ("left", LEFT_COLOR), ("total", TOTAL_COLOR)):
        series = [xy(t, p[key]) for p, t in timed if p[key] is not None]
        if len(series) > 1:
            draw.line(series, fill=color, width=2)
        for (p, _), (x, y) in zip([pt for pt in timed if pt[0][key] is not None], series, strict=True):
            r = 5 if p["current"] else 3
            draw.ellipse([x - r, y - r, x + r, y + r], fill=color)


def _draw_dates(draw: ImageDraw.ImageDraw, timed: list[tuple[dict, dt.datetime]], xy: _ToPixel, y1: int,
                width: int, font) -> None:
    """Dates under the points: first and last always; others when they do not overlap their neighbours."""
    placed: list[tuple[int, int]] = []
    order = [0, len(timed) - 1] + list(range(1, len(timed) - 1))
    for i in order:
        p, t = timed[i]
        text = t.strftime(DATE_FORMAT)
        w = measure_text(draw, text, font)
        x = min(max(xy(t, 0)[0] - w // 2, 2), width - w - 2)
        if any(not (x + w + 4 < a or x > b + 4) for a, b in placed):
            continue
        placed.append((x, x + w))
        draw.text((x, y1 + 8), text, font=font, fill=TOTAL_COLOR if p["current"] else AXIS_COLOR)


def _draw_legend(draw: ImageDraw.ImageDraw, x: int, y: int, font) -> None:
    """Colour swatch and name of each series, left to right from (x, y)."""
    for name, color in (("total", TOTAL_COLOR), ("right lung", RIGHT_COLOR), ("left lung", LEFT_COLOR)):
        draw.rectangle([x, y + 3, x + 10, y + 9], fill=color)
        draw.text((x + 14, y), name, font=font, fill=AXIS_COLOR)
        x += 24 + measure_text(draw, name, font)

def with_comparison(summary: np.ndarray, comparison: dict | None) -> np.ndarray:
    """``summary`` with the follow-up band appended below it; unchanged without a comparison."""
    if not comparison:
        return summary
    assessment = Assessment.from_json(comparison)
    height, width = summary.shape[:2]
    plot_width = min(PLOT_WIDTH, width // 2)
    band = Image.new("RGB", (width, BAND_HEIGHT), PANEL_BACKGROUND)
    draw = ImageDraw.Draw(band)
    pad = 14
    text_width = width - plot_width - 2 * pad
    y = pad
    title_color = PROGRESSION_COLOR if assessment.progression else WARNING_COLOR
    draw.text((pad, y), title_text(assessment), font=title_font(), fill=title_color)
    y += TITLE_SIZE + 10
    body = load_font(BODY_SIZE)
    for text, color in change_lines(assessment):
        for part in wrap_text(draw, text, body, text_width):
            if y + BODY_SIZE > BAND_HEIGHT - 4:
                break
            draw.text((pad, y), part, font=body, fill=color)
            y += BODY_SIZE + 5
        y += 3
    band.paste(draw_trend_plot(trend_points(comparison), plot_width, BAND_HEIGHT), (width - plot_width, 0))
    draw.line([(0, 0), (width, 0)], fill=AXIS_COLOR, width=1)
    return np.concatenate([summary, np.asarray(band, dtype=np.uint8)], axis=0)


def render_summary_png(source_datasets, result, path):
    """``render.render_summary_png`` with the follow-up band (what the SC summary shows)."""
    from pathlib import Path

    from worker.outputs import render

    path = Path(render.render_summary_png(source_datasets, result, path))
    pixels = with_comparison(np.asarray(Image.open(path).convert("RGB")), getattr(result, "comparison", None))
    Image.fromarray(pixels, mode="RGB").save(path, format="PNG", optimize=False)
    return path
