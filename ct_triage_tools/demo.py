"""`ct-triage demo`: the whole loop on one machine, for a newcomer's first run.

Starts an embedded daemon (node + worker) and a local PACS (Orthanc when installed,
else a small pynetdicom store SCP writing to a folder), sends three phantom studies
of different severity, waits until their outputs have arrived in the PACS, and
prints what came back with the path of a PNG rendering of each summary image.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from ct_triage.contract import EmbeddedPublisher
from ct_triage.runtime import open_database
from ct_triage.settings import Settings, parse_destination
from ct_triage_tools.pacs import LocalPacs
from ct_triage_tools.phantom import write_phantom
from ct_triage_tools.ports import free_port
from db.models import Delivery, Result, Study
from db.session import session_scope
from dicom_node import DicomNode
from worker.delivery.scu import send_instances
from worker.outputs.render import render_summary_png
from worker.tasks.context import WorkerContext
from worker.tasks.embedded import EmbeddedConsumer
from worker.tasks.outputs import load_result, source_datasets

log = logging.getLogger("ct_triage.demo")

# (requested involvement %, seed): one CT-1, one CT-2, one CT-3 study.
CASES = [(12.0, 1), (38.0, 2), (62.0, 3)]
PHANTOM: dict[str, Any] = dict(slices=80, rows=256, slice_spacing_mm=4.0)


@dataclass
class DemoRow:
    requested_percent: float
    study_instance_uid: str
    expected_category: str
    category: str | None = None
    involvement_percent: float | None = None
    priority: str | None = None
    seconds_to_pacs: float | None = None
    png: Path | None = None
    state: str = "waiting"


def run_demo(base_settings: Settings, workdir: Path, timeout_s: float = 600) -> list[DemoRow]:
    workdir = Path(workdir).resolve()  # the default var/demo is relative; Orthanc runs in its own folder
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    pacs = LocalPacs(workdir / "pacs")
    pacs.start()
    settings = Settings.from_env(
        {}, var_dir=workdir / "var", port=free_port(), bind_address="127.0.0.1", stable_age_s=3.0,
        poll_interval_s=0.3, destinations=[pacs.destination], min_free_disk_mb=64,
        device=base_settings.device, scorer=base_settings.scorer, unet_weights=base_settings.unet_weights,
        retry_base_s=1.0)
    engine, factory = open_database(settings)
    node = DicomNode(settings, factory, EmbeddedPublisher())
    node.start()
    consumer = EmbeddedConsumer(WorkerContext(settings, factory, EmbeddedPublisher()), poll_interval_s=0.3)
    consumer.start()
    rows: list[DemoRow] = []
    try:
        print(f"PACS: {pacs.kind} ({pacs.destination}); ct-triage node CTTRIAGE on port {node.port}")
        for percent, seed in CASES:
            folder = workdir / "phantoms" / f"p{int(percent)}"
            truth = write_phantom(folder, percent, seed=seed, kernels=("FC51",), **PHANTOM)
            files = sorted(folder.rglob("*.dcm"))
            report = send_instances(parse_destination(f"{settings.ae_title}@127.0.0.1:{node.port}"), files,
                                    calling_ae_title="DEMOCT")
            if not report.delivered:
                raise RuntimeError(f"sending the phantom failed: {report.reason}")
            rows.append(DemoRow(percent, truth["study_instance_uid"], truth["category"]))
            print(f"sent phantom study {len(rows)} ({percent:.0f}% involvement, {len(files)} slices)")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(r.state == "waiting" for r in rows):
            time.sleep(0.5)
            with session_scope(factory) as session:
                for row in rows:
                    if row.state != "waiting":
                        continue
                    result = session.scalar(select(Result).join(Study)
                                            .where(Study.study_instance_uid == row.study_instance_uid))
                    if result is None:
                        continue
                    row.category, row.involvement_percent, row.priority = (
                        result.category, result.involvement_percent, result.priority)
                    deliveries = session.scalars(select(Delivery).where(Delivery.result_fk == result.id)).all()
                    if any(d.state == "failed" for d in deliveries):
                        row.state = "delivery failed: " + "; ".join(d.last_error or "" for d in deliveries)
                    elif deliveries and all(d.state == "delivered" for d in deliveries):
                        row.state = "in PACS"
                        delivered = [d.delivered_at for d in deliveries if d.delivered_at is not None]
                        if delivered and result.received_at is not None:
                            row.seconds_to_pacs = (max(delivered) - result.received_at).total_seconds()
                        score = load_result(session, result)
                        datasets = source_datasets(session, result, score, settings.effective_storage_dir)
                        row.png = render_summary_png(datasets, score, workdir / f"summary-{row.category}.png")
        return rows
    finally:
        consumer.stop()
        node.stop()
        engine.dispose()
        pacs.stop()


def print_rows(rows: list[DemoRow]) -> None:
    print()
    print(f"{'phantom':>8}  {'expected':8}  {'category':8}  {'involvement':>11}  {'priority':8}  "
          f"{'s to PACS':>9}  state")
    for r in rows:
        pct = f"{r.involvement_percent:.1f}%" if r.involvement_percent is not None else "-"
        secs = f"{r.seconds_to_pacs:.1f}" if r.seconds_to_pacs is not None else "-"
        print(f"{r.requested_percent:7.0f}%  {r.expected_category:8}  {r.category or '-':8}  {pct:>11}  "
              f"{r.priority or '-':8}  {secs:>9}  {r.state}")
    print("\nseconds to PACS: from the last instance received to the outputs acknowledged by the PACS "
          "(each series completes at once by ImagesInAcquisition)")
    for r in rows:
        if r.png:
            print(f"summary image: {r.png}")
