"""SC, SEG and SR of a scored phantom study in Orthanc; build once, send many; HIGH first.

Real pieces only: the phantom written as DICOM, the classical scorer, the builders, the
stored files, pynetdicom sending them undecoded, Orthanc as the PACS (its REST API reads
back what it stored and renders previews), dciodvfy and dcmtk's dsrdump.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import select, update

from ct_triage.contract import EmbeddedPublisher
from ct_triage.settings import Settings
from db.models import Delivery, Instance, OutputFile, Result, Series, Study
from tests.support import orthanc as orthanc_support
from tests.support.ct_datasets import make_chest_ct
from tests.support.dciodvfy import dciodvfy_errors
from tests.support.orthanc import OrthancServer
from tests.support.scanner import require_dcmtk, storescu
from tests.test_node import wait_for
from worker.delivery.scu import send_instances
from worker.outputs import render
from worker.outputs.sc import build_secondary_capture_series
from worker.outputs.stored import build_output_datasets, masks_relpath, result_folder, write_outputs
from worker.scoring.masks import save_masks
from worker.tasks.context import WorkerContext
from worker.tasks.embedded import EmbeddedConsumer
from worker.tasks.outputs import stored_outputs

# A CT-3 phantom fine enough for the classical scorer's lesions to match the truth
# (Dice about 0.91 here); 80 slices x 3.75 mm span the lungs.
PHANTOM = dict(slices=80, rows=256, slice_spacing_mm=3.75)
CALLING = "CTTRIAGE"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
CREATED = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)


@pytest.fixture(autouse=True)
def _tools():
    require_dcmtk()
    orthanc_support.require_orthanc()


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """(source datasets in result order, result with masks, truth, phantom folder)."""
    from ct_triage_tools.phantom import write_phantom
    from worker.scoring.pipeline import score_path

    folder = tmp_path_factory.mktemp("phantom62")
    truth = write_phantom(folder, 62, seed=4, **PHANTOM)
    result = score_path(folder / "FC51", Settings.from_env({}))
    assert result.status == "scored" and result.category == "CT-3", result.reason
    by_uid = {str(ds.SOPInstanceUID): ds for ds in (dcmread(p) for p in (folder / "FC51").glob("*.dcm"))}
    datasets = [by_uid[uid] for uid in result.source_sop_instance_uids]
    return datasets, result, truth, folder


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    with OrthancServer(tmp_path_factory.mktemp("pacs"), aet="ORTHANC") as server:
        yield server


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_sr_seg_and_sc_land_in_orthanc_valid_and_true(tmp_path, scored, pacs):
    from ct_triage_tools.phantom import read_truth_masks

    datasets, result, truth, folder = scored
    items = build_output_datasets(datasets, result, 1, created_at=None, masks=result.masks)
    assert [role for role, _ in items[:2]] == ["sr", "seg"] and {r for r, _ in items[2:]} == {"sc"}
    files = write_outputs(tmp_path / "storage", result_folder(result.study_instance_uid, 1), items)
    paths = [tmp_path / "storage" / f.path for f in files]
    report = send_instances(pacs.destination, paths, calling_ae_title=CALLING)
    assert report.outcome == "delivered", report.reason
    assert len(report.delivered_sop_instance_uids) == len(items)

    by_class: dict[str, list] = {}
    for f, path in zip(files, paths):
        instance_id = pacs.instance_id(f.sop_instance_uid)
        assert instance_id, f.role
        raw = pacs.instance_file(instance_id)
        copy = tmp_path / f"{f.role}-{instance_id}.dcm"
        copy.write_bytes(raw)
        assert dciodvfy_errors(copy) == [], f"{f.role}: {dciodvfy_errors(copy)}"
        stored, ours = dcmread(io.BytesIO(raw)), dcmread(path)
        # what Orthanc holds is what we stored, element for element (sent undecoded)
        assert stored.file_meta.TransferSyntaxUID == ours.file_meta.TransferSyntaxUID
        assert stored == ours
        by_class.setdefault(str(stored.SOPClassUID), []).append(copy)
    assert len(by_class[SR_CLASS]) == 1 and len(by_class[SEG_CLASS]) == 1 and len(by_class[SC_CLASS]) > 1

    # The SEG's lesion segments against the phantom's truth masks (written by write_phantom):
    # one "Lesions" segment, or ground glass and consolidation when the scorer splits them
    seg = hd.seg.segread(by_class[SEG_CLASS][0])
    numbers = [s.SegmentNumber for s in seg.SegmentSequence
               if s.SegmentLabel in ("Lesions", "Ground glass opacity", "Consolidation")]
    assert numbers
    lesion = seg.get_pixels_by_source_instance(source_sop_instance_uids=result.source_sop_instance_uids,
                                               segment_numbers=numbers, combine_segments=True,
                                               assert_missing_frames_are_empty=True) > 0
    truth_masks = read_truth_masks(folder)
    slice_of = {b["sop_instance_uid"]: b["slice_index"] for b in truth["lesion_boxes"]}
    for k, uid in enumerate(result.source_sop_instance_uids):  # truth slices are in the same order
        assert slice_of.get(uid, k) == k
    assert np.array_equal(lesion, result.masks.original("lesion")), "the SEG carries the scorer's mask exactly"
    assert _dice(lesion, truth_masks["lesion"]) >= 0.9
    lungs = [s.SegmentNumber for s in seg.SegmentSequence if s.SegmentLabel.endswith("lung")]
    lung = seg.get_pixels_by_source_instance(source_sop_instance_uids=result.source_sop_instance_uids,
                                             segment_numbers=lungs, combine_segments=True,
                                             assert_missing_frames_are_empty=True) > 0
    assert _dice(lung, truth_masks["lung"]) >= 0.9

    dsrdump = shutil.which("dsrdump") or "/usr/bin/dsrdump"
    out = subprocess.run([dsrdump, str(by_class[SR_CLASS][0])], capture_output=True, text=True, errors="replace",
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert '"Referenced Segment"' in out.stdout and "CT-3" in out.stdout
    assert any(f"(SG image,,{number})" in out.stdout for number in numbers)  # the SR's lesions refer to them

    # A rebuild (crash before recording, or another worker) writes identical bytes.
    again = write_outputs(tmp_path / "again", result_folder(result.study_instance_uid, 1),
                          build_output_datasets(datasets, result, 1, created_at=None, masks=result.masks))
    assert [(f.sop_instance_uid, f.sha256) for f in again] == [(f.sop_instance_uid, f.sha256) for f in files]


@pytest.mark.parametrize("compression", ["none", "rle", "jpeg-baseline"])
def test_each_sc_compression_lands_renders_and_decodes(tmp_path, scored, pacs, compression):
    datasets, result, _, _ = scored
    version = {"none": 7, "rle": 8, "jpeg-baseline": 9}[compression]  # new UIDs: Orthanc keeps the first copy
    images = build_secondary_capture_series(datasets, result, version, compression=compression, max_slices=2)
    assert len(images) == 3  # summary + the 2 slices with the largest boxed area
    sent = send_instances(pacs.destination, images, calling_ae_title=CALLING)
    assert sent.outcome == "delivered", sent.reason
    overlay = render.caption_overlay(render.caption_text(result), int(datasets[0].Columns))
    for image in images:
        instance_id = pacs.instance_id(image.SOPInstanceUID)
        raw = pacs.instance_file(instance_id)
        path = tmp_path / f"{compression}-{image.InstanceNumber}.dcm"
        path.write_bytes(raw)
        assert dciodvfy_errors(path) == [], dciodvfy_errors(path)
        preview = pacs.request("GET", f"/instances/{instance_id}/preview", raw=True)
        assert preview[:8] == b"\x89PNG\r\n\x1a\n", "Orthanc renders it"
        back = dcmread(path)
        assert back.file_meta.TransferSyntaxUID == {"none": "1.2.840.10008.1.2.1", "rle": "1.2.840.10008.1.2.5",
                                                    "jpeg-baseline": "1.2.840.10008.1.2.4.50"}[compression]
        pixels = back.pixel_array
        if image.InstanceNumber == 1:
            expected = render.render_summary(datasets, result)
        else:
            k = result.source_sop_instance_uids.index(image.SourceImageSequence[0].ReferencedSOPInstanceUID)
            boxes = [b for b in result.boxes if b.slice_index == k]
            expected = render.render_slice(datasets[k], boxes, result, overlay=overlay)
        assert pixels.shape == expected.shape
        if compression == "jpeg-baseline":
            assert back.LossyImageCompression == "01" and back.LossyImageCompressionMethod == "ISO_10918_1"
            error = pixels.astype(np.float64) - expected.astype(np.float64)
            psnr = 10 * np.log10(255.0**2 / np.mean(error**2))
            print(f"jpeg-baseline image {image.InstanceNumber}: {psnr:.1f} dB")
            assert psnr > 27.0, psnr  # close: lossy (34-35 dB on slices, less on the text panel)
            red = (expected[..., 0] == 255) & (expected[..., 1] == 0) & (expected[..., 2] == 0)
            if red.any():  # the boxes stay red
                reddish = pixels[..., 0].astype(int) - pixels[..., 1:].max(axis=-1) > 80
                assert (reddish & red).sum() / red.sum() > 0.8
        else:
            assert np.array_equal(pixels, expected)


def test_sc_slices_setting_keeps_the_largest_lesion_slices(scored):
    datasets, result, _, _ = scored
    area: dict[int, int] = {}
    for b in result.boxes:
        area[b.slice_index] = area.get(b.slice_index, 0) + (b.row_max - b.row_min + 1) * (b.col_max - b.col_min + 1)
    top = sorted(sorted(area, key=lambda k: (-area[k], k))[:5])
    images = build_secondary_capture_series(datasets, result, 1, compression="none", max_slices=5)
    referenced = [result.source_sop_instance_uids.index(i.SourceImageSequence[0].ReferencedSOPInstanceUID)
                  for i in images[1:]]
    assert referenced == top
    assert [i.InstanceNumber for i in images] == [1, 2, 3, 4, 5, 6]
    everything = build_secondary_capture_series(datasets, result, 1, compression="none")
    assert len(everything) == len(area) + 1


# -- build once, send many; HIGH first ---------------------------------------------------------
def _orthanc_arrivals(pacs: OrthancServer) -> list[tuple[str, str]]:
    """(StudyInstanceUID, SOPClassUID) of each stored instance, in the order Orthanc stored them."""
    changes = pacs.get("/changes?limit=10000")["Changes"]
    arrivals = []
    for change in sorted(changes, key=lambda c: c["Seq"]):
        if change["ChangeType"] == "NewInstance":
            tags = pacs.instance_tags(change["ID"])
            arrivals.append((tags["StudyInstanceUID"], tags["SOPClassUID"]))
    return arrivals


def _seed_results(running, tmp_path: Path, destination: str, priorities: list[str]) -> tuple[list, list[int]]:
    """One small CT per priority, stored through the node, each with a scored result of that
    priority and a pending delivery to ``destination``, created in the order given.
    Returns (the CTs, the delivery ids) in that order."""
    categories = {"LOW": "CT-1", "HIGH": "CT-3", "MEDIUM": "CT-2"}
    cts = []
    for i in range(len(priorities)):
        ct = make_chest_ct(n_slices=4, size=64, seed=40 + i, patient_id=f"ORDER-{i}", accession_number=f"ACC{i}")
        folder = tmp_path / f"ct{i}"
        folder.mkdir()
        for k, ds in enumerate(ct.datasets):
            ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)
        assert storescu(running.port, sorted(folder.glob("*.dcm"))).returncode == 0
        cts.append(ct)

    def indexed():
        with running.session() as session:
            return len(session.scalars(select(Instance.id)).all()) == 4 * len(cts)
    wait_for(indexed, timeout=60, interval=0.2)

    storage = running.settings.effective_storage_dir
    delivery_ids = []
    with running.session() as session:
        for priority, ct in zip(priorities, cts, strict=True):
            score = ct.score_result()
            score.category = categories[priority]
            assert score.priority == priority
            study = session.scalar(select(Study).where(Study.study_instance_uid == ct.study_instance_uid))
            series = session.scalar(select(Series).where(Series.series_instance_uid == ct.series_instance_uid))
            relpath = masks_relpath(ct.study_instance_uid, 1)
            save_masks(storage / relpath, score.masks)
            result = Result(study_fk=study.id, version=1, series_fk=series.id, status="scored",
                            category=score.category, priority=score.priority, result_json=_json(score),
                            masks_path=relpath, scored_at=CREATED)
            session.add(result)
            session.flush()
            delivery = Delivery(result_fk=result.id, destination=destination, state="pending",
                                created_at=CREATED + dt.timedelta(seconds=len(delivery_ids)))
            session.add(delivery)
            session.flush()
            delivery_ids.append(delivery.id)
        session.commit()
    return cts, delivery_ids


def _assert_arrived_in_order(arrivals: list[tuple[str, str]], expected_study_order: list[str]) -> None:
    """Studies reached the PACS in ``expected_study_order``; each study's SR and SEG before its SC."""
    study_order = list(dict.fromkeys(study for study, _ in arrivals))
    assert study_order == expected_study_order
    for study_uid in expected_study_order:
        classes = [cls for study, cls in arrivals if study == study_uid]
        assert classes[:2] == [SR_CLASS, SEG_CLASS] and set(classes[2:]) == {SC_CLASS}


def test_queued_deliveries_after_an_outage_go_high_first_from_stored_files(start_node, sqlite_url, tmp_path):
    pacs = OrthancServer(tmp_path / "orthanc")  # configured, not started: connection refused
    running = start_node(sqlite_url, destinations=[str(pacs.destination)], retry_base_s=1)
    order = ["LOW", "HIGH", "MEDIUM"]  # created in this order
    seeded, _ = _seed_results(running, tmp_path, str(pacs.destination), order)
    cts = dict(zip(order, seeded, strict=True))
    storage = running.settings.effective_storage_dir

    consumer = EmbeddedConsumer(WorkerContext(running.settings, running.session_factory, EmbeddedPublisher()))
    # One failed attempt defers the destination's other waiting deliveries (worker.tasks.deliver aligns
    # them): make each delivery due again until each has been tried once against the dead PACS.
    for _ in range(3):
        consumer.run_deliveries()
        with running.session() as session:
            if {d.state for d in session.scalars(select(Delivery))} == {"retrying"}:
                break
            session.execute(update(Delivery).where(Delivery.state == "pending").values(next_attempt_at=None))
            session.commit()
    with running.session() as session:
        assert {d.state for d in session.scalars(select(Delivery))} == {"retrying"}
        built = {r.priority: r.outputs_built_at for r in session.scalars(select(Result))}
        files = session.scalars(select(OutputFile)).all()
    assert all(built.values()), "outputs built on the first attempt"
    assert {f.role for f in files} == {"sr", "seg", "sc"}
    before = {f.path: hashlib.sha256((storage / f.path).read_bytes()).hexdigest() for f in files}

    # The retries must not need the sources: remove them from the storage folder.
    with running.session() as session:
        for path in session.scalars(select(Instance.path)):
            (storage / path).unlink()
        session.execute(update(Delivery).values(next_attempt_at=None))
        session.commit()

    pacs.start()
    try:
        assert consumer.run_deliveries() == 3
        with running.session() as session:
            states = {d.state for d in session.scalars(select(Delivery))}
            assert states == {"delivered"}, [d.last_error for d in session.scalars(select(Delivery))]
            assert len(session.scalars(select(OutputFile)).all()) == len(files), "nothing rebuilt"
        assert {p: hashlib.sha256((storage / p).read_bytes()).hexdigest() for p in before} == before
        # The audit trail: each delivery that reached the PACS is one Instances Transferred (sent)
        # message naming the PACS; the attempts against the dead PACS sent nothing and failed only
        # transiently, so they left none.
        from db.models import AuditEvent

        with running.session() as session:
            sent = [e for e in session.scalars(select(AuditEvent).where(AuditEvent.kind == "instances_transferred"))
                    if e.action == "R"]
        assert len(sent) == 3 and all(e.outcome == 0 for e in sent)
        arrivals = _orthanc_arrivals(pacs)
    finally:
        pacs.stop()
    _assert_arrived_in_order(arrivals, [cts[p].study_instance_uid for p in ("HIGH", "MEDIUM", "LOW")])
    high_folder = result_folder(cts["HIGH"].study_instance_uid, 1)
    assert any(p.startswith(high_folder + "/") for p in before)
    assert all(cts["HIGH"].study_instance_uid not in p for p in before), "paths come from hashes"


def _json(score) -> str:
    import json

    return json.dumps(score.to_json())


def test_stored_outputs_are_rebuilt_when_their_files_are_gone(start_node, sqlite_url, tmp_path):
    running = start_node(sqlite_url)
    ct = make_chest_ct(n_slices=4, size=64, seed=50)
    folder = tmp_path / "ct"
    folder.mkdir()
    for k, ds in enumerate(ct.datasets):
        ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)
    assert storescu(running.port, sorted(folder.glob("*.dcm"))).returncode == 0

    def indexed():
        with running.session() as session:
            return len(session.scalars(select(Instance.id)).all()) == 4
    wait_for(indexed, timeout=60, interval=0.2)
    with running.session() as session:
        study = session.scalar(select(Study))
        series = session.scalar(select(Series))
        score = ct.score_result()
        result = Result(study_fk=study.id, version=1, series_fk=series.id, status="scored", category=score.category,
                        priority=score.priority, result_json=_json(score), scored_at=CREATED)
        session.add(result)
        session.commit()
        result_id = result.id
    ctx = WorkerContext(running.settings, running.session_factory, EmbeddedPublisher())
    first = stored_outputs(ctx, result_id)
    assert first == stored_outputs(ctx, result_id)  # recorded: the same files again
    data = {p: p.read_bytes() for p in first}
    first[0].unlink()
    second = stored_outputs(ctx, result_id)
    assert second == first and {p: p.read_bytes() for p in second} == data
    assert all(isinstance(p, Path) and p.is_file() for p in second)


def test_celery_worker_sends_high_first_after_an_outage(postgres_url, redis_url, start_node, tmp_path):
    """Celery mode (worker.tasks.deliver.deliver_in_order): the messages are published LOW first, and
    each retry comes back on its own countdown; the PACS must still get HIGH first."""
    from ct_triage.contract import DELIVER_OUTPUTS, CeleryPublisher
    from tests.support.daemon import Daemon
    from tests.test_node_process import node_env

    pacs = OrthancServer(tmp_path / "orthanc")  # configured, not started: connection refused
    destination = str(pacs.destination)
    running = start_node(postgres_url, destinations=[destination], stable_age_s=3600)  # no scoring jobs
    order = ["LOW", "MEDIUM", "HIGH", "LOW", "HIGH"]  # created, and published, in this order
    cts, delivery_ids = _seed_results(running, tmp_path, destination, order)
    env = node_env(tmp_path, postgres_url, running.port, broker_url=redis_url, destinations=destination,
                   retry_base_s=1, retry_max_s=2)
    worker = Daemon(["worker", "--queues", "io", "--concurrency", "1"], env, tmp_path / "worker.log").start()
    publisher = CeleryPublisher(redis_url)
    for delivery_id in delivery_ids:
        publisher.publish(DELIVER_OUTPUTS, delivery_id)

    def attempts() -> int:
        with running.session() as session:
            return sum(d.attempts for d in session.scalars(select(Delivery)))
    try:
        wait_for(lambda: attempts() >= 3, timeout=90, interval=0.2)  # the outage was met repeatedly
        with running.session() as session:
            assert {d.state for d in session.scalars(select(Delivery))} <= {"pending", "retrying", "sending"}
        pacs.start()

        def delivered() -> bool:
            with running.session() as session:
                return {d.state for d in session.scalars(select(Delivery))} == {"delivered"}
        wait_for(delivered, timeout=90, interval=0.2)
        arrivals = _orthanc_arrivals(pacs)
    finally:
        worker.stop()
        pacs.stop()
        print(worker.log()[-5000:])  # pytest shows it when the test fails
    by_priority = sorted(range(len(order)), key=lambda i: (["HIGH", "MEDIUM", "LOW"].index(order[i]), i))
    _assert_arrived_in_order(arrivals, [cts[i].study_instance_uid for i in by_priority])
