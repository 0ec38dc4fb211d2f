"""The read-only web application: worklist page, JSON API, pictures, /metrics (Starlette).

Routes (GET and HEAD only; any other method is answered 405 and nothing ever writes):

- ``/``: the worklist page (HTML, refreshes itself every ``HTTP_REFRESH_S``).
- ``/api/worklist``: the same rows as JSON. ``/api/studies/{uid}``: one study with its
  versions, turnaround and deliveries (400 for a malformed UID, 404 for an unknown one).
- ``/thumbnails/{uid}.png`` and ``/summaries/{uid}.png``: the result's pictures.
- ``/chart/turnaround.svg``: the last 24 hours' turnaround chart.
- ``/metrics``: Prometheus text format. ``/healthz``: ``ok``; ``/favicon.ico``: the icon
  (these two show no data and need no token).
- ``/static/...``: the page's CSS, JavaScript and icon, served from this package (no CDN).

A database that does not answer gives 503 with one log line (``/metrics`` still answers,
with ``ct_triage_database_up 0``).

Patient data: the page and the API show accession number, study date and description,
never patient name, ID, birth date or sex (the ``worklist`` view does not carry them).
A multi-valued DICOM string (stored ``\\``-separated) is shown with its values joined
by ", " (:func:`dicom_display`).
Every DICOM-sourced string is cleaned (control characters removed, length capped)
before it is sent, and HTML-escaped in the page; the page's script only moves nodes
the server rendered (no ``innerHTML`` of data). A Content-Security-Policy allows only
this server's own scripts, styles and images.

Access: without ``HTTP_TOKEN`` the page is bound to loopback and answers only requests
whose Host is a loopback name (no DNS rebinding). When ``HTTP_TOKEN`` is set (required
off localhost, see the settings) every route but ``/healthz`` and ``/favicon.ico`` needs
it, as ``Authorization: Bearer <token>``, or the ``ct_triage_token`` cookie, or once as
``?token=`` on a page URL (answered with a redirect that sets the HttpOnly,
SameSite=Strict cookie and drops the token from the address bar). Tokens are compared
in constant time.
"""

from __future__ import annotations

import hmac
import html
import logging
import unicodedata
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from ct_triage import __version__
from dashboard import chart, metrics
from dashboard.auditing import HttpAudit
from dashboard.thumbnails import Thumbnails

log = logging.getLogger("ct_triage.dashboard")

STATIC_DIR = Path(__file__).resolve().parent / "static"
TOKEN_COOKIE = "ct_triage_token"
# Need no token and show no data: the health check, and the icon a browser asks for on any page.
PUBLIC_PATHS = frozenset({"/healthz", "/favicon.ico"})
TEXT_LIMIT = 64  # longest DICOM text the page shows (LO is 64 characters)
REASON_LIMIT = 200
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-resource-policy": "same-origin",
}
PRIORITY_LABELS = {"HIGH": "High", "MEDIUM": "Medium", "LOW": "Low"}
SEVERITY = {"CT-0": "no signs", "CT-1": "mild", "CT-2": "moderate", "CT-3": "severe", "CT-4": "critical"}
STATE_LABELS = {
    "receiving": "receiving", "stable": "waiting", "queued": "queued", "scoring": "scoring",
    "scored": "scored", "delivering": "sending to PACS", "delivered": "in PACS",
    "delivery_failed": "PACS delivery failed", "failed": "scoring failed", "not_applicable": "not applicable",
    "not selected": "not selected",
}


def clean_text(value: object, limit: int = TEXT_LIMIT) -> str:
    """A DICOM string fit for a page: control and format characters dropped, whitespace folded, capped."""
    if value is None:
        return ""
    text = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in str(value))
    text = " ".join(text.replace("^", " ").split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def dicom_display(value: object, limit: int = TEXT_LIMIT) -> str:
    """A DICOM string as the page shows it: a multi-valued one (stored ``\\``-separated, as
    DICOM writes it) with its values joined by ", " (``CHEST\\LOW DOSE`` -> ``CHEST, LOW DOSE``)."""
    if value is None:
        return ""
    values = [clean_text(v, limit) for v in str(value).split("\\")]
    return clean_text(", ".join(v for v in values if v), limit)


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z") if value else None


def format_waiting(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    return f"{hours // 24} d {hours % 24} h"


def _pct(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.0f}%" if value >= 10 or value == 0 else f"{value:.1f}%"


def row_json(row) -> dict:
    """The public form of a worklist row (API and page)."""
    uid = row.study_instance_uid
    return {
        "study_instance_uid": uid,
        "version": row.version,
        "accession_number": dicom_display(row.accession_number, 64),
        "study_date": clean_text(row.study_date, 8),
        "study_description": dicom_display(row.study_description),
        "priority": row.priority,
        "state": row.state,
        "status": row.result_status,
        "category": row.category,
        "involvement_percent": row.involvement_percent,
        "involvement_percent_left": row.involvement_percent_left,
        "involvement_percent_right": row.involvement_percent_right,
        "lesion_volume_ml": row.lesion_volume_ml,
        "reason": clean_text(row.reason, REASON_LIMIT) or None,
        "model": clean_text(row.model) or None,
        "arrived_at": _iso(row.arrived_at),
        "scored_at": _iso(row.scored_at),
        "delivered_at": _iso(row.delivered_at),
        "waiting_s": round(row.waiting_s, 1) if row.waiting_s is not None else None,
        "change_since_prior": row.change_since_prior,
        "thumbnail": f"/thumbnails/{uid}.png?v={row.version}.{row.result_id or 0}",
        "summary": f"/summaries/{uid}.png?v={row.version}.{row.result_id or 0}",
    }


class SecurityHeaders:
    """Adds the security headers to every response (pure ASGI: works for streaming too)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                for name, value in SECURITY_HEADERS.items():
                    if name.encode() not in present:
                        headers.append((name.encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class TokenGate:
    """Requires the token (header, cookie or ?token=) on every route but PUBLIC_PATHS."""

    def __init__(self, app: ASGIApp, token: str, http_audit: HttpAudit | None = None):
        self.app = app
        self.token = token.encode()
        self.http_audit = http_audit

    def _matches(self, presented: str | None) -> bool:
        if not presented:
            return False
        return hmac.compare_digest(presented.encode(), self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        auth = request.headers.get("authorization", "")
        bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        client = request.client.host if request.client else None
        for presented in (bearer, request.cookies.get(TOKEN_COOKIE)):
            if self._matches(presented):
                if self.http_audit is not None:
                    await run_in_threadpool(self.http_audit.read, client, scope["path"], str(presented))
                await self.app(scope, receive, send)
                return
        query_token = request.query_params.get("token")
        if query_token and self._matches(query_token) and request.method in ("GET", "HEAD"):
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            # Always a path on this server: "//host" would leave it.
            target = "/" + request.url.path.lstrip("/") + (f"?{urlencode(rest)}" if rest else "")
            response: Response = RedirectResponse(target, status_code=303)
            response.set_cookie(TOKEN_COOKIE, query_token, httponly=True, samesite="strict", path="/",
                                secure=request.url.scheme == "https")
        else:
            if self.http_audit is not None:
                presented = bearer or request.cookies.get(TOKEN_COOKIE) or query_token
                await run_in_threadpool(self.http_audit.failure, client, presented,
                                        "wrong token" if presented else "no token")
            response = PlainTextResponse("401 Unauthorized: ct-triage needs its access token\n", status_code=401,
                                         headers={"www-authenticate": 'Bearer realm="ct-triage"'})
        await response(scope, receive, send)


class LoopbackHostGuard:
    """Without a token the page is bound to loopback: refuse requests naming another host.

    A web page elsewhere could otherwise point its own host name at 127.0.0.1 (DNS
    rebinding) and read the worklist through the radiologist's browser. A reverse proxy
    on the same machine must pass ``Host: 127.0.0.1`` (or set a token).
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not _loopback_host(Request(scope).headers.get("host", "")):
            await PlainTextResponse("400 Bad Request: unexpected Host\n", status_code=400)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _loopback_host(host_header: str) -> bool:
    from ct_triage.settings import is_loopback

    host = host_header.strip()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return bool(host) and is_loopback(host)


class Dashboard:
    """The application's state: settings, database, picture cache, metrics registry."""

    def __init__(self, settings, session_factory):
        self.settings = settings
        self.session_factory = session_factory
        self.thumbnails = Thumbnails(settings.effective_storage_dir)
        self.registry = metrics.make_registry(session_factory, settings.effective_storage_dir, __version__)

    # -- data -----------------------------------------------------------------------
    def worklist(self) -> list:
        from db.views import worklist_rows

        with self.session_factory() as session:
            return worklist_rows(session, received_within_s=self.settings.http_worklist_hours * 3600)

    def series_of(self, uids) -> dict:
        """StudyInstanceUID -> its series as shown (:mod:`ct_triage.series_display`)."""
        from ct_triage.series_display import series_by_study

        with self.session_factory() as session:
            return series_by_study(session, uids)

    def expiries(self, rows: list) -> dict[int, datetime]:
        """When each row's SCHEDULED UPS workitem expires (CT_TRIAGE_WORKLIST_EXPIRY_H), by result id."""
        from db.worklist import expiry_of_results

        with self.session_factory() as session:
            return expiry_of_results(session, [r.result_id for r in rows if r.result_id])

    def turnaround_rows(self, now: datetime) -> list[dict]:
        from db.views import turnaround_since

        with self.session_factory() as session:
            return turnaround_since(session, now - chart.WINDOW)

    # -- routes ---------------------------------------------------------------------
    def page(self, request: Request) -> Response:
        now = datetime.now(UTC)
        rows = self.worklist()
        turnaround = self.turnaround_rows(now)
        body = render_page(rows, turnaround, now, self.settings.http_refresh_s,
                           self.settings.http_worklist_hours,
                           series=self.series_of(r.study_instance_uid for r in rows), expiries=self.expiries(rows))
        return HTMLResponse(body, headers={"cache-control": "no-store"})

    def api_worklist(self, request: Request) -> Response:
        rows = self.worklist()
        series = self.series_of(r.study_instance_uid for r in rows)
        return JSONResponse({"generated_at": _iso(datetime.now(UTC)),
                             "received_within_hours": self.settings.http_worklist_hours,
                             "studies": [{**row_json(r), "series": series_json(series.get(r.study_instance_uid, []))}
                                         for r in rows]}, headers={"cache-control": "no-store"})

    def api_study(self, request: Request) -> Response:
        from db.views import study_deliveries, study_versions, worklist_row

        uid = request.path_params["uid"]
        if not _valid_uid(uid):
            return JSONResponse({"error": "not a valid DICOM UID"}, status_code=400)
        with self.session_factory() as session:
            row = worklist_row(session, uid)
            if row is None:
                return JSONResponse({"error": "unknown study"}, status_code=404)
            versions = study_versions(session, uid)
            deliveries = study_deliveries(session, row.result_id) if row.result_id else []
        data = row_json(row)
        data["series"] = series_json(self.series_of([uid]).get(uid, []))
        data["versions"] = [{
            "version": v["version"], "superseded": bool(v["superseded"]), "status": v["status"],
            "category": v["category"], "priority": v["priority"],
            **{k: _iso(v[k]) for k in ("received_at", "stable_at", "scoring_started_at", "scored_at",
                                       "delivered_at")},
            **{k: v[k] for k in ("receive_to_stable_s", "queue_wait_s", "scoring_s", "delivery_s",
                                 "received_to_scored_s", "received_to_delivered_s")},
        } for v in versions]
        data["deliveries"] = [{"destination": clean_text(d), "state": s, "attempts": a,
                               "last_error": clean_text(e, REASON_LIMIT) or None} for d, s, a, e in deliveries]
        return JSONResponse(data, headers={"cache-control": "no-store"})

    def picture(self, request: Request) -> Response:
        from db.views import worklist_row

        kind = "summary" if request.url.path.startswith("/summaries/") else "thumbnail"
        uid = request.path_params["uid"]
        if not _valid_uid(uid):
            return PlainTextResponse("not a valid DICOM UID\n", status_code=400)
        with self.session_factory() as session:
            row = worklist_row(session, uid)
        if row is None:
            return PlainTextResponse("unknown study\n", status_code=404)
        png = self.thumbnails.get(self.session_factory, row.result_id, kind)
        return Response(png, media_type="image/png", headers={"cache-control": "private, max-age=300"})

    def turnaround_chart(self, request: Request) -> Response:
        now = datetime.now(UTC)
        return Response(chart.turnaround_svg(self.turnaround_rows(now), now), media_type="image/svg+xml",
                        headers={"cache-control": "no-store"})

    def metrics(self, request: Request) -> Response:
        return Response(metrics.render(self.registry), media_type=metrics.CONTENT_TYPE,
                        headers={"cache-control": "no-store"})

    @staticmethod
    def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    @staticmethod
    def favicon(request: Request) -> Response:
        return Response((STATIC_DIR / "favicon.svg").read_bytes(), media_type="image/svg+xml",
                        headers={"cache-control": "public, max-age=86400"})


def _valid_uid(uid: str) -> bool:
    from dicom_node.uids import is_valid_uid

    return is_valid_uid(uid)


async def database_unavailable(request: Request, exc: Exception) -> Response:
    """One log line and a 503 when the database fails (no traceback, nothing from the query)."""
    log.warning("%s %s: database unavailable: %s", request.method, request.url.path,
                str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
    return PlainTextResponse("503 Service Unavailable: the ct-triage database does not answer\n", status_code=503,
                             headers={"retry-after": "15", "cache-control": "no-store"})


def create_app(settings, session_factory) -> Starlette:
    from sqlalchemy.exc import SQLAlchemyError

    dash = Dashboard(settings, session_factory)
    routes = [
        Route("/", dash.page, methods=["GET"]),
        Route("/api/worklist", dash.api_worklist, methods=["GET"]),
        Route("/api/studies/{uid}", dash.api_study, methods=["GET"]),
        Route("/thumbnails/{uid}.png", dash.picture, methods=["GET"]),
        Route("/summaries/{uid}.png", dash.picture, methods=["GET"]),
        Route("/chart/turnaround.svg", dash.turnaround_chart, methods=["GET"]),
        Route("/metrics", dash.metrics, methods=["GET"]),
        Route("/healthz", dash.healthz, methods=["GET"]),
        Route("/favicon.ico", dash.favicon, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    middleware = [Middleware(SecurityHeaders)]
    if settings.http_token:
        middleware.append(Middleware(TokenGate, token=settings.http_token,
                                     http_audit=HttpAudit(settings, session_factory)))
    else:
        middleware.append(Middleware(LoopbackHostGuard))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={SQLAlchemyError: database_unavailable})
    app.state.dashboard = dash
    return app


# -- the page -------------------------------------------------------------------------
def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def series_json(items) -> list[dict]:
    """The series of a study for the API: number, description, kernel, thickness, the
    stored state, the state as shown (``not selected`` for a twin left out) and why."""
    return [item.to_json() for item in items]


def _series_html(items) -> str:
    """One line per series under the study's state: ``#2 LUNG · L · 1 mm: scored``; a twin
    left out reads ``not selected`` with why, in grey (it is no failure)."""
    lines = []
    for item in items:
        facts = " \u00b7 ".join(filter(None, [clean_text(item.description, 24), clean_text(item.kernel, 16),
                                              item.thickness_text if item.slice_thickness is not None else ""]))
        number = f"#{item.series_number}" if item.series_number is not None else "#?"
        label = STATE_LABELS.get(item.shown_state, item.shown_state)
        reason = clean_text(item.reason, REASON_LIMIT)
        css = "not-selected" if item.shown_state == "not selected" else item.state
        title = f' title="{_e(reason)}"' if reason else ""
        lines.append(f'<span class="sub series sr-{_e(css.replace(" ", "-"))}"{title}>{_e(number)} {_e(facts)}: '
                     f'{_e(label)}{(" (" + _e(clean_text(reason, 60)) + ")") if reason else ""}</span>')
    return "".join(lines)


def _expiry_html(expires_at: datetime | None, now: datetime | None) -> str:
    """The "worklist item expires in 5 h 03 min" line of a SCHEDULED UPS workitem (dicom_node.expiry)."""
    if expires_at is None or now is None:
        return ""
    left = (expires_at - now).total_seconds()
    text = f"worklist item expires in {format_waiting(left)}" if left > 0 else "worklist item expiring"
    return f'<span class="sub expiry" title="UPS workitem expiry (CT_TRIAGE_WORKLIST_EXPIRY_H)">{_e(text)}</span>'


def _row_html(row, index: int, series=(), expires_at: datetime | None = None,
              now: datetime | None = None) -> str:
    data = row_json(row)
    priority = row.priority
    if row.category:
        category = (f'<span class="cat">{_e(row.category)}</span>'
                    f'<span class="sub">{_e(SEVERITY.get(row.category, ""))}</span>')
    else:
        category = '<span class="cat none">&ndash;</span>'
    if row.change_since_prior:  # issue 12: vs the patient's prior study
        change = _e(row.change_since_prior)
        category += f'<span class="sub change ch-{change}">{change} since prior</span>'
    if row.involvement_percent is not None:
        percent = (f'<span class="pct">{_e(_pct(row.involvement_percent))}</span>'
                   f'<span class="sub">R {_e(_pct(row.involvement_percent_right))} &middot; '
                   f'L {_e(_pct(row.involvement_percent_left))}</span>')
    else:
        percent = '<span class="pct none">&ndash;</span>'
    state = STATE_LABELS.get(row.state, row.state)
    reason = data["reason"] if row.state in ("failed", "not_applicable", "delivery_failed") else None
    state_html = f'<span class="state st-{_e(row.state)}">{_e(state)}</span>'
    if reason:
        state_html += f'<span class="sub reason" title="{_e(reason)}">{_e(clean_text(reason, 60))}</span>'
    state_html += _series_html(series)  # which series was scored, and why the others were not
    description = data["study_description"] or "(no description)"
    study_date = data["study_date"]
    if len(study_date) == 8 and study_date.isdigit():
        study_date = f"{study_date[:4]}-{study_date[4:6]}-{study_date[6:]}"
    arrived = f"{row.arrived_at:%H:%M} UTC" if row.arrived_at else ""
    return (
        f'<tr class="row prio-{_e(priority.lower())}" data-uid="{_e(row.study_instance_uid)}" '
        f'data-priority="{_e(priority)}">'
        f'<td class="rank">{index}</td>'
        f'<td><span class="badge b-{_e(priority.lower())}">{_e(PRIORITY_LABELS.get(priority, priority))}</span></td>'
        f'<td class="thumb"><a href="{_e(data["summary"])}" target="_blank" rel="noopener">'
        f'<img src="{_e(data["thumbnail"])}" alt="summary of {_e(row.category or row.state)}" '
        f'loading="lazy" height="96"></a></td>'
        f'<td>{category}</td><td>{percent}</td><td>{state_html}</td>'
        f'<td class="wait" data-waiting-s="{_e(data["waiting_s"])}">{_e(format_waiting(row.waiting_s))}'
        f'<span class="sub">since {_e(arrived)}</span>{_expiry_html(expires_at, now)}</td>'
        f'<td><span class="acc">{_e(data["accession_number"] or "-")}</span>'
        f'<span class="sub">{_e(description)} &middot; {_e(study_date)}</span></td>'
        "</tr>"
    )


def render_page(rows: list, turnaround: list[dict], now: datetime, refresh_s: float, hours: float,
                series: dict | None = None, expiries: dict[int, datetime] | None = None) -> str:
    counts = {p: sum(1 for r in rows if r.priority == p) for p in ("HIGH", "MEDIUM", "LOW")}
    pending = sum(1 for r in rows if r.state in ("receiving", "stable", "queued", "scoring"))
    values = [r["received_to_scored_s"] for r in turnaround if r.get("received_to_scored_s") is not None]
    p50 = chart.percentile(values, 0.5)
    tiles = [
        ("t-high", counts["HIGH"], "High priority"),
        ("t-medium", counts["MEDIUM"], "Medium priority"),
        ("t-low", counts["LOW"], "Low priority"),
        ("t-pending", pending, "Waiting to be scored"),
        ("t-tat", chart.format_seconds(p50) if p50 is not None else "&ndash;", "Median turnaround, 24 h"),
    ]
    tiles_html = "".join(f'<div class="tile {cls}"><div class="num">{value if cls == "t-tat" else _e(value)}'
                         f'</div><div class="lbl">{_e(label)}</div></div>' for cls, value, label in tiles)
    if rows:
        expiries = expiries or {}
        body = "".join(_row_html(r, i, (series or {}).get(r.study_instance_uid, ()), expiries.get(r.result_id or 0),
                                 now) for i, r in enumerate(rows, start=1))
    else:
        body = (f'<tr class="empty"><td colspan="8">No study received in the last {hours:g} hours.</td></tr>')
    svg = chart.turnaround_svg(turnaround, now)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>ct-triage worklist</title>
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/static/worklist.css">
<script src="/static/worklist.js" defer></script>
</head>
<body data-refresh-s="{refresh_s:g}">
<header>
  <div class="brand">ct-triage <span>COVID-19 chest CT triage worklist</span></div>
  <div class="meta"><span id="updated">updated {now:%H:%M:%S} UTC</span>
  <span class="warn">NOT FOR DIAGNOSTIC USE</span></div>
</header>
<main>
<section id="tiles" class="tiles">{tiles_html}</section>
<section class="card">
<h2>Worklist <small>read HIGH first, then the oldest; studies of the last {hours:g} h</small></h2>
<table id="worklist">
<thead><tr><th>#</th><th>Priority</th><th>Summary</th><th>Category</th><th>Involvement</th><th>State</th>
<th>Waiting</th><th>Accession &middot; study</th></tr></thead>
<tbody id="worklist-body">{body}</tbody>
</table>
</section>
<section class="card">
<h2>Turnaround, last 24 h <small>last instance received &rarr; scored, one dot per study coloured by priority;
dashed: p50 and p95; times in UTC</small></h2>
<div id="chart">{svg}</div>
</section>
</main>
<footer>ct-triage {_e(__version__)} &middot; CT-0..CT-4 after MosMedData (doi:10.17816/DD46826) &middot;
the AI result is a triage aid, not a diagnosis</footer>
</body>
</html>
"""
