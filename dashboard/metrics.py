"""``/metrics``: Prometheus text exposition, read from the database at each scrape.

Every number comes from the database (the node and the workers may be separate
processes; the database is what they share), so any one process serving the page
reports the whole deployment. A custom collector reads one snapshot per scrape
(:func:`db.views.metrics_snapshot`); nothing is kept between scrapes.

Families (all prefixed ``ct_triage_``):

- ``studies_received_total``, ``instances_received_total``, ``instances_rejected_total``: counters.
- ``results_total{status,category,priority}``: counter, every scored version.
- ``worklist_studies{priority,state}``: gauge, current study versions (the ``worklist`` view).
- ``queue_depth{queue,state}`` and ``queue_oldest_seconds{queue,state}``: gauges from the
  ``queue_depth`` view (series waiting to settle, scoring jobs, outbox rows).
- ``deliveries{state}``: gauge, outbox rows by state.
- ``turnaround_seconds{interval,quantile}``: gauge, p50/p95 over results scored in the
  last 24 hours, for ``received_to_scored`` and ``received_to_delivered``;
  ``turnaround_results_24h``: how many results that is.
- ``storage_free_bytes``, ``storage_total_bytes``: gauges of the storage folder's filesystem.
- ``database_up``: 1 when the snapshot was read, 0 when the database failed (then only
  ``database_up``, storage and ``build_info`` are exported).
- ``build_info{version}``: 1.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dashboard.chart import percentile

log = logging.getLogger("ct_triage.dashboard")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "ct_triage_"
QUEUE_STATES = {"series": ("receiving", "stable"), "scoring": ("queued", "running"),
                "delivery": ("pending", "sending", "retrying")}
DELIVERY_STATES = ("pending", "sending", "retrying", "delivered", "failed")
INTERVALS = ("received_to_scored", "received_to_delivered")


class DatabaseCollector:
    def __init__(self, session_factory, storage_dir: Path, version: str):
        self.session_factory = session_factory
        self.storage_dir = Path(storage_dir)
        self.version = version

    def collect(self):
        from db.views import metrics_snapshot

        info = GaugeMetricFamily(PREFIX + "build_info", "ct-triage build", labels=["version"])
        info.add_metric([self.version], 1)
        yield info
        yield from self._storage()
        up = GaugeMetricFamily(PREFIX + "database_up", "1 when the database answered this scrape")
        try:
            with self.session_factory() as session:
                snap = metrics_snapshot(session)
        except Exception as exc:  # a scrape reports the failure, never raises
            log.warning("/metrics: database unavailable: %s", str(exc).splitlines()[0][:200])
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        for name, value, text in (("studies_received", snap.studies_received, "Studies received"),
                                  ("instances_received", snap.instances_received, "Instances stored"),
                                  ("instances_rejected", snap.instances_rejected,
                                   "C-STORE requests answered with a failure status")):
            counter = CounterMetricFamily(PREFIX + name, text)
            counter.add_metric([], value)
            yield counter

        results = CounterMetricFamily(PREFIX + "results", "Scoring results (every study version)",
                                      labels=["status", "category", "priority"])
        for status, category, priority, count in snap.results:
            results.add_metric([status, category, priority], count)
        yield results

        worklist = GaugeMetricFamily(PREFIX + "worklist_studies", "Current study versions by priority and state",
                                     labels=["priority", "state"])
        for priority, state, count in snap.worklist:
            worklist.add_metric([priority, state], count)
        yield worklist

        depth = GaugeMetricFamily(PREFIX + "queue_depth", "Items waiting per queue and state",
                                  labels=["queue", "state"])
        oldest = GaugeMetricFamily(PREFIX + "queue_oldest_seconds", "Age of the oldest waiting item",
                                   labels=["queue", "state"])
        found = {(q, s): (n, w) for q, s, n, w in snap.queues}
        for queue, states in QUEUE_STATES.items():
            for state in states:
                items, waiting = found.get((queue, state), (0, None))
                depth.add_metric([queue, state], items)
                oldest.add_metric([queue, state], max(0.0, waiting or 0.0))
        yield depth
        yield oldest

        deliveries = GaugeMetricFamily(PREFIX + "deliveries", "Outbox rows by state", labels=["state"])
        by_state = dict(snap.deliveries)
        for state in sorted(set(DELIVERY_STATES) | set(by_state)):
            deliveries.add_metric([state], by_state.get(state, 0))
        yield deliveries

        turnaround = GaugeMetricFamily(PREFIX + "turnaround_seconds",
                                       "Turnaround quantiles over results scored in the last 24 h",
                                       labels=["interval", "quantile"])
        for interval in INTERVALS:
            values = [r[f"{interval}_s"] for r in snap.turnaround_24h if r[f"{interval}_s"] is not None]
            for q in (0.5, 0.95):
                value = percentile(values, q)
                if value is not None:
                    turnaround.add_metric([interval, str(q)], value)
        yield turnaround
        count = GaugeMetricFamily(PREFIX + "turnaround_results_24h", "Results scored in the last 24 h")
        count.add_metric([], len(snap.turnaround_24h))
        yield count

    def _storage(self):
        free = GaugeMetricFamily(PREFIX + "storage_free_bytes", "Free bytes on the storage filesystem")
        total = GaugeMetricFamily(PREFIX + "storage_total_bytes", "Size of the storage filesystem")
        folder = self.storage_dir
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            usage = shutil.disk_usage(folder)
        except OSError:
            return
        free.add_metric([], usage.free)
        total.add_metric([], usage.total)
        yield free
        yield total


def make_registry(session_factory, storage_dir: Path, version: str) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(session_factory, storage_dir, version))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
