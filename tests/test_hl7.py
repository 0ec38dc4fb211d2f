"""HL7 v2 messages and MLLP sending against a real listener built on python-hl7."""

from __future__ import annotations

from datetime import datetime, timezone

import hl7
import pytest

from tests.support.mllp import MllpListener
from tests.support.scanner import free_port
from worker.worklist.hl7 import Hl7Context, build_messages, observation_result, order_update, send_messages, text

NASTY_NAME = "O|BRIEN^ANNE~MARIE&CO\\X^^DR"  # every HL7 delimiter in a DICOM PN


def context(**overrides) -> Hl7Context:
    values = dict(result_id=7, result_version=1, status="scored", reason=None, category="CT-3", priority="HIGH",
                  involvement_percent=62.14, involvement_percent_left=55.0, involvement_percent_right=70.2,
                  lung_volume_ml=4100.0, lesion_volume_ml=2500.0, lesion_count=6, model="ct-triage-classical",
                  model_version="0.1.0", scored_at=datetime(2026, 11, 30, 9, 0, tzinfo=timezone.utc),
                  study_instance_uid="1.2.826.0.1.3680043.8.498.42", accession_number="A|42",
                  study_date="20261130", patient_id="P^42", issuer_of_patient_id="HOSP",
                  patient_name=NASTY_NAME, patient_birth_date="19700101", patient_sex="F")
    values.update(overrides)
    return Hl7Context(**values)


def obx_by_code(message: hl7.Message) -> dict[str, hl7.Segment]:
    return {str(seg(3)(1)(1)): seg for seg in message.segments("OBX")}


@pytest.mark.parametrize("priority,code", [("HIGH", "S"), ("MEDIUM", "A"), ("LOW", "R")])
def test_orm_carries_the_priority_in_orc7_and_obr27_keyed_by_accession_and_study(priority, code):
    parsed = hl7.parse(str(order_update(context(priority=priority))))
    assert str(parsed.segment("MSH")(9)) == "ORM^O01^ORM_O01"
    assert str(parsed.segment("ORC")(1)) == "XO"
    assert str(parsed.segment("ORC")(7)(1)(6)) == code
    assert str(parsed.segment("OBR")(27)(1)(6)) == code
    assert parsed.unescape(str(parsed.segment("OBR")(18))) == "A|42"
    assert parsed.unescape(str(parsed.segment("ORC")(3))) == "A|42"
    assert str(parsed.segment("ZDS")(1)(1)(1)) == "1.2.826.0.1.3680043.8.498.42"


def test_omi_carries_the_priority_in_tq1_9_and_the_study_in_ipc():
    parsed = hl7.parse(str(order_update(context(order_message="OMI^O23", priority="LOW"))))
    assert str(parsed.segment("MSH")(9)) == "OMI^O23^OMI_O23"
    assert str(parsed.segment("TQ1")(9)(1)(1)) == "R" and str(parsed.segment("TQ1")(9)(1)(3)) == "HL70485"
    assert str(parsed.segment("IPC")(3)) == "1.2.826.0.1.3680043.8.498.42"
    assert parsed.unescape(str(parsed.segment("IPC")(1))) == "A|42"
    assert str(parsed.segment("IPC")(5)) == "CT"


def test_patient_data_is_escaped_and_round_trips():
    for message in build_messages(context()):
        raw = str(message)
        assert raw.count("\r") == len(message)  # no delimiter leaked into a new segment
        parsed = hl7.parse(raw)
        pid = parsed.segment("PID")
        assert len(pid) == 9  # PID-1..8: no extra field from the '|'
        name = pid(5)(1)
        assert [parsed.unescape(str(name(i))) for i in (1, 2, 3, 4, 5)] == ["O|BRIEN", "ANNE~MARIE&CO\\X", "",
                                                                            "", "DR"]
        assert parsed.unescape(str(pid(3)(1)(1))) == "P^42" and str(pid(3)(1)(4)) == "HOSP"


def test_control_characters_and_length_are_sanitised():
    assert text("a\r\nb\x1bc\x00d") == "a  b c d"
    assert len(text("x" * 10000)) == 250
    message = observation_result(context(status="failed", category=None, priority="MEDIUM",
                                         reason="bad\rsegment|injection\x07" + "y" * 1000))
    parsed = hl7.parse(str(message))
    assert [str(s[0]) for s in parsed][:4] == ["MSH", "PID", "ORC", "OBR"]
    reason = parsed.unescape(str(obx_by_code(parsed)["CTT006"](5)))
    assert reason.startswith("bad segment|injection") and len(reason) <= 250


def test_oru_has_category_percentages_volumes_routing_model_and_disclaimer():
    parsed = hl7.parse(str(observation_result(context())))
    assert str(parsed.segment("MSH")(9)) == "ORU^R01^ORU_R01"
    obx = obx_by_code(parsed)
    assert str(obx["CTT002"](5)(1)(1)) == "CT-3"
    assert str(obx["CTT001"](5)) == "62.1" and str(obx["CTT001"](6)(1)(1)) == "%"
    assert str(obx["CTT001R"](5)) == "70.2" and str(obx["CTT001L"](5)) == "55.0"
    assert str(obx["39607008"](5)) == "4100.0" and str(obx["52988006"](6)(1)(1)) == "mL"
    assert "immediate admission" in str(obx["CTT005"](5))
    assert str(obx["CTT004"](5)(1)(1)) == "S"
    assert str(obx["CTT008"](5)) == "ct-triage-classical 0.1.0"
    assert str(obx["CTT009"](5)) == "NOT FOR DIAGNOSTIC USE"
    assert str(obx["110180"](5)) == "1.2.826.0.1.3680043.8.498.42"
    assert all(str(s(11)) == "P" for s in parsed.segments("OBX"))
    assert "CTT015" not in obx  # no prior compared: no change line


def test_oru_carries_the_change_since_the_prior_escaped():
    change = "progression: 21% -> 34% (+60%) in 36 h since 2026-11-28 | kernel B70f^FC51"
    parsed = hl7.parse(str(observation_result(context(change_since_prior=change))))
    obx = obx_by_code(parsed)
    assert str(obx["CTT015"](2)) == "ST"
    assert parsed.unescape(str(obx["CTT015"](5))) == change


def test_an_order_without_accession_number_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="Accession Number"):
        build_messages(context(accession_number=""))


def test_send_waits_for_each_ack_and_classifies_the_answer():
    port = free_port()
    messages = build_messages(context())
    down = send_messages(f"127.0.0.1:{port}", messages, timeout_s=5)
    assert down.outcome == "transient" and down.accepted == 0
    listener = MllpListener(port).start()
    try:
        ok = send_messages(f"mllp://127.0.0.1:{port}", messages, timeout_s=5)
        assert ok.outcome == "delivered" and ok.accepted == 2
        assert [str(m.segment("MSH")(10)) for m in listener.messages] == ["CTT7O", "CTT7R"]
        listener.ack_code = "AE"
        refused = send_messages(f"127.0.0.1:{port}", messages, timeout_s=5)
        assert refused.outcome == "permanent" and refused.accepted == 0
        assert "AE" in refused.reason and "order not found" in refused.reason
    finally:
        listener.stop()


# -- through the outbox (worker.tasks.deliver), on SQLite and PostgreSQL ------------------------------------
def test_hl7_outbox_delivers_stops_and_retries_once(start_node, database_url):
    from sqlalchemy import select

    from ct_triage.contract import EmbeddedPublisher
    from ct_triage.errors import TransientError
    from db.models import Delivery
    from tests.test_ups import T0, seed
    from worker.tasks.context import WorkerContext
    from worker.tasks.deliver import deliver_outputs

    ok_port, refusing_port, late_port = free_port(), free_port(), free_port()
    running = start_node(database_url, retry_base_s=0.2, hl7_ack_timeout_s=5,
                         hl7_destinations=[f"127.0.0.1:{p}" for p in (ok_port, refusing_port, late_port)])
    seed(running, "1.2.826.0.1.3680043.8.498.21", category="CT-4", percent=80.0, arrived=T0,
         patient_name="SMITH^JO|E")
    ctx = WorkerContext(running.settings, running.session_factory, EmbeddedPublisher())
    ok, refusing = MllpListener(ok_port).start(), MllpListener(refusing_port, ack_code="AR").start()
    late = MllpListener(late_port)
    try:
        with running.session() as session:
            rows = {d.destination: d.id for d in session.scalars(select(Delivery).where(Delivery.channel == "hl7"))}
        assert deliver_outputs(ctx, rows[f"mllp://127.0.0.1:{ok_port}"]) == "delivered"
        assert deliver_outputs(ctx, rows[f"mllp://127.0.0.1:{refusing_port}"]) == "failed"
        with pytest.raises(TransientError):
            deliver_outputs(ctx, rows[f"mllp://127.0.0.1:{late_port}"])
        assert deliver_outputs(ctx, rows[f"mllp://127.0.0.1:{late_port}"]) == "skipped"  # not due yet
        late.start()
        import time

        time.sleep(0.3)
        assert deliver_outputs(ctx, rows[f"mllp://127.0.0.1:{late_port}"]) == "delivered"
        assert deliver_outputs(ctx, rows[f"mllp://127.0.0.1:{late_port}"]) == "skipped"  # done: never again
        with running.session() as session:
            state = {d.destination: d for d in session.scalars(select(Delivery))}
        assert state[f"mllp://127.0.0.1:{refusing_port}"].last_error.startswith("RIS answered AR")
        assert state[f"mllp://127.0.0.1:{late_port}"].attempts == 2
        assert [str(m.segment("ORC")(7)(1)(6)) for m in ok.of_type("ORM")] == ["S"]
        assert len(ok.messages) == 2 and len(late.messages) == 2 and len(refusing.messages) == 1
        pid = ok.messages[0].segment("PID")
        assert ok.messages[0].unescape(str(pid(5)(1)(2))) == "JO|E"
    finally:
        for listener in (ok, refusing, late):
            listener.stop()
