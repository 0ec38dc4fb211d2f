"""The worklist page's turnaround chart: an SVG drawn here, no JavaScript library, no CDN.

One dot per result scored in the last 24 hours at (scored time, seconds from the last
instance received to scored), coloured by priority; dashed lines mark the median (p50)
and the 95th percentile (p95) over the window. The y axis is linear from 0 to a round
number above the largest value. Every text in the SVG is escaped.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from html import escape

WIDTH = 960
HEIGHT = 240
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 110, 16, 34
WINDOW = timedelta(hours=24)
PRIORITY_COLORS = {"HIGH": "#d32f2f", "MEDIUM": "#f59e0b", "LOW": "#2e7d32"}


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (same definition as PostgreSQL's percentile_cont)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _nice_ceiling(value: float) -> float:
    if value <= 0:
        return 60.0
    exponent = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * exponent >= value:
            return step * exponent
    return 10 * exponent


def format_seconds(value: float) -> str:
    if value < 10 and value != int(value):
        return f"{value:.1f} s"
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


def turnaround_svg(rows: list[dict], now: datetime) -> str:
    """``rows``: turnaround view rows (``scored_at``, ``received_to_scored_s``, ``priority``)."""
    start = now - WINDOW
    points = [(r["scored_at"], float(r["received_to_scored_s"]), r.get("priority") or "MEDIUM") for r in rows
              if r.get("scored_at") is not None and r.get("received_to_scored_s") is not None
              and start <= r["scored_at"] <= now]
    values = [p[1] for p in points]
    top = _nice_ceiling(max(values) * 1.1 if values else 60.0)
    plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM

    def x_of(t: datetime) -> float:
        return MARGIN_LEFT + plot_w * (t - start).total_seconds() / WINDOW.total_seconds()

    def y_of(v: float) -> float:
        return MARGIN_TOP + plot_h * (1 - min(v, top) / top)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
           f'height="{HEIGHT}" role="img" aria-labelledby="chart-title" font-family="system-ui, sans-serif" '
           f'font-size="12">',
           '<title id="chart-title">Turnaround, last 24 hours: seconds from last instance received to scored'
           '</title>',
           f'<rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{plot_w}" height="{plot_h}" fill="#ffffff" '
           f'stroke="#d0d5dd"/>']
    for i in range(5):
        value = top * i / 4
        y = y_of(value)
        out.append(f'<line x1="{MARGIN_LEFT}" x2="{MARGIN_LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
                   f'stroke="#eef0f4"/>')
        out.append(f'<text x="{MARGIN_LEFT - 8}" y="{y + 4:.1f}" text-anchor="end" fill="#475467">'
                   f'{escape(format_seconds(value))}</text>')
    first_tick = start.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    tick = first_tick
    while tick <= now:
        if tick.hour % 3 == 0:
            x = x_of(tick)
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{MARGIN_TOP}" y2="{MARGIN_TOP + plot_h}" '
                       f'stroke="#eef0f4"/>')
            out.append(f'<text x="{x:.1f}" y="{HEIGHT - 12}" text-anchor="middle" fill="#475467">'
                       f'{tick:%H:%M}</text>')
        tick += timedelta(hours=1)
    label_y: float | None = None
    for label, q in (("p50", 0.5), ("p95", 0.95)):
        quantile = percentile(values, q)
        if quantile is None:
            continue
        y = y_of(quantile)
        out.append(f'<line class="{label}" x1="{MARGIN_LEFT}" x2="{MARGIN_LEFT + plot_w}" y1="{y:.1f}" '
                   f'y2="{y:.1f}" stroke="#344054" stroke-dasharray="6 4"/>')
        text_y = y + 4 if label_y is None else min(y + 4, label_y - 14)  # p95 label above p50's
        label_y = text_y
        out.append(f'<text x="{MARGIN_LEFT + plot_w + 10}" y="{text_y:.1f}" fill="#344054">'
                   f'{label} {escape(format_seconds(quantile))}</text>')
    for scored_at, value, priority in points:
        color = PRIORITY_COLORS.get(priority, "#667085")
        out.append(f'<circle class="point" cx="{x_of(scored_at):.1f}" cy="{y_of(value):.1f}" r="4" '
                   f'fill="{color}" fill-opacity="0.85"><title>{escape(priority)}: '
                   f'{escape(format_seconds(value))} at {scored_at:%H:%M} UTC</title></circle>')
    if not points:
        out.append(f'<text x="{MARGIN_LEFT + plot_w / 2}" y="{MARGIN_TOP + plot_h / 2}" text-anchor="middle" '
                   f'fill="#667085">No study scored in the last 24 hours</text>')
    out.append("</svg>")
    return "\n".join(out)
