"""HL7 v2 messages and MLLP sending against a real listener built on python-hl7."""

from __future__ import annotations

from datetime import UTC, datetime

import hl7
import pytest

from ct_triage.errors import ConfigError
from ct_triage.settings import Hl7Destination, Settings, parse_hl7_destination
from tests.support.mllp import MllpListener, server_tls_context
from tests.support.pki import Pki
from tests.support.scanner import free_port
from worker.worklist.hl7 import (
    Hl7Context,
    build_messages,
    observation_result,
    order_update,
    send_messages,
    text,
    tls_context,
)

NASTY_NAME = "O|BRIEN^ANNE~MARIE&CO\\X^^DR"  # every HL7 delimiter in a DICOM PN


def context(**overrides) -> Hl7Context:
    values = dict(result_id=7, result_version=1, status="scored", reason=None, category="CT-3", priority="HIGH",
                  involvement_percent=62.14, involvement_percent_left=55.0, involvement_percent_right=70.2,
                  lung_volume_ml=4100.0, lesion_volume_ml=2500.0, lesion_count=6, model="ct-triage-classical",
                  model_version="0.1.0", scored_at=datetime(2026, 11, 30, 9, 0, tzinfo=UTC),
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
        # "\\" is DICOM's value separator (a PN cannot hold one): two names, two repetitions
        first, second = pid(5)(1), pid(5)(2)
        assert [parsed.unescape(str(first(i))) for i in (1, 2)] == ["O|BRIEN", "ANNE~MARIE&CO"]
        assert [parsed.unescape(str(second(i))) for i in (1, 2, 3)] == ["X", "", "DR"]  # DR: middle name
        assert parsed.unescape(str(pid(3)(1)(1))) == "P^42" and str(pid(3)(1)(4)) == "HOSP"


def test_multi_valued_patient_id_and_name_become_repetitions_each_escaped():
    # DICOM's value separator "\\" becomes HL7's repetition separator "~"; no bare "\\" reaches HL7.
    ctx = context(patient_name="A^B\\C^D\\O|B~X^Y", patient_id="ID1\\ID^2", accession_number="X\\Y")
    for message in build_messages(ctx):
        raw = str(message)
        pid_raw = next(line for line in raw.split("\r") if line.startswith("PID|"))
        assert pid_raw.split("|")[3] == "ID1^^^HOSP~ID\\S\\2^^^HOSP"
        assert pid_raw.split("|")[5] == "A^B~C^D~O\\F\\B\\R\\X^Y"
        assert "|X\\E\\Y|" in raw  # a "\\" outside PID-3/5 is escaped, never bare
        parsed = hl7.parse(raw)
        pid = parsed.segment("PID")
        assert [parsed.unescape(str(pid(3)(r)(1))) for r in (1, 2)] == ["ID1", "ID^2"]
        assert [str(pid(3)(r)(4)) for r in (1, 2)] == ["HOSP", "HOSP"]
        assert len(pid(5)) == 3
        assert [[parsed.unescape(str(pid(5)(r)(c))) for c in (1, 2)] for r in (1, 2, 3)] == [
            ["A", "B"], ["C", "D"], ["O|B~X", "Y"]]
    single = hl7.parse(str(order_update(context(patient_name="DOE^JANE", patient_id="P1",
                                                issuer_of_patient_id=""))))
    assert str(single.segment("PID")(5)) == "DOE^JANE" and str(single.segment("PID")(3)) == "P1"


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
        # The audit trail: one message per acknowledged HL7 message (5), one for the refusal (outcome 4).
        from db.models import AuditEvent

        with running.session() as session:
            sent = list(session.scalars(select(AuditEvent).where(AuditEvent.kind == "hl7_sent")))
        assert sorted(e.outcome for e in sent) == [0, 0, 0, 0, 4]
        assert all("SMITH" not in (e.user_id or "") for e in sent)
    finally:
        for listener in (ok, refusing, late):
            listener.stop()


# -- MLLP over TLS (issue 17 item 6) ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The RIS's CA and certificates: for 127.0.0.1, for another host name, our client; and a stranger CA."""
    folder = tmp_path_factory.mktemp("hl7-pki")
    ours, stranger = Pki(folder / "ca"), Pki(folder / "stranger", name="stranger CA")
    return {"ca": ours.ca, "ris": ours.issue("ris"), "elsewhere": ours.issue("elsewhere", hosts=("ris.example",)),
            "client": ours.issue("ct-triage"), "stranger_ca": stranger.ca,
            "stranger_client": stranger.issue("stranger")}


def test_hl7_destinations_parse_tls_and_tls_settings_are_validated(pki):
    assert parse_hl7_destination("ris.local:2575+tls") == Hl7Destination("ris.local", 2575, True)
    assert str(parse_hl7_destination("mllp://10.0.0.2:6661+tls")) == "mllp://10.0.0.2:6661+tls"
    assert parse_hl7_destination(str(parse_hl7_destination("ris:1+tls"))).tls
    assert not parse_hl7_destination("ris:2575").tls
    with pytest.raises(ConfigError, match=r"host:port\[\+tls\]"):
        parse_hl7_destination("ris:2575+ssl")
    key, cert = pki["client"]
    s = Settings.from_env({}, hl7_destinations="ris:2575+tls", hl7_tls_ca=str(pki["ca"]), hl7_tls_cert=str(cert),
                          hl7_tls_key=str(key))
    assert s.hl7_tls_ca == pki["ca"] and s.hl7_tls_key == key
    with pytest.raises(ConfigError, match="HL7_TLS_KEY is required"):
        Settings.from_env({}, hl7_tls_cert=str(cert))
    with pytest.raises(ConfigError, match="HL7_TLS_KEY is set without"):
        Settings.from_env({}, hl7_tls_key=str(key))


def test_send_over_tls_verifies_the_ris_certificate_and_presents_ours(pki):
    messages = build_messages(context())
    key, cert = pki["ris"]
    ours = tls_context(pki["ca"])
    assert ours.minimum_version >= __import__("ssl").TLSVersion.TLSv1_2 and ours.check_hostname

    port = free_port()
    listener = MllpListener(port, tls=server_tls_context(cert, key)).start()
    try:
        ok = send_messages(f"127.0.0.1:{port}+tls", messages, timeout_s=5,
                           settings=Settings(hl7_tls_ca=pki["ca"]))
        assert (ok.outcome, ok.accepted, ok.reason) == ("delivered", 2, None)
        assert [str(m.segment("MSH")(10)) for m in listener.messages] == ["CTT7O", "CTT7R"]

        untrusted = send_messages(f"127.0.0.1:{port}+tls", messages, timeout_s=5,
                                  settings=Settings(hl7_tls_ca=pki["stranger_ca"]))
        assert untrusted.outcome == "permanent" and untrusted.accepted == 0
        assert untrusted.reason.startswith(f"TLS certificate of 127.0.0.1:{port} rejected: ")
        assert "unable to get local issuer certificate" in untrusted.reason
        system_cas = send_messages(f"127.0.0.1:{port}+tls", messages, timeout_s=5)  # no settings: system CAs
        assert system_cas.outcome == "permanent" and "rejected" in system_cas.reason

        plain = send_messages(f"127.0.0.1:{port}", messages, timeout_s=2)  # MLLP in clear to a TLS port
        assert plain.outcome == "transient"
        assert len(listener.messages) == 2
    finally:
        listener.stop()

    key, cert = pki["elsewhere"]  # signed by the right CA, for another host name
    port = free_port()
    listener = MllpListener(port, tls=server_tls_context(cert, key)).start()
    try:
        mismatch = send_messages(f"127.0.0.1:{port}+tls", messages, timeout_s=5,
                                 settings=Settings(hl7_tls_ca=pki["ca"]))
        assert mismatch.outcome == "permanent"
        assert mismatch.reason.startswith(f"TLS certificate of 127.0.0.1:{port} rejected: ")
        assert "mismatch" in mismatch.reason and not listener.messages
    finally:
        listener.stop()

    key, cert = pki["ris"]  # a RIS that requires a client certificate signed by its CA
    port = free_port()
    listener = MllpListener(port, tls=server_tls_context(cert, key, client_ca=pki["ca"])).start()
    try:
        anonymous = send_messages(f"127.0.0.1:{port}+tls", messages, timeout_s=5,
                                  settings=Settings(hl7_tls_ca=pki["ca"]))
        assert anonymous.outcome == "transient" and anonymous.accepted == 0 and not listener.messages
        skey, scert = pki["stranger_client"]
        refused = send_messages(f"127.0.0.1:{port}+tls", messages, timeout_s=5,
                                settings=Settings(hl7_tls_ca=pki["ca"], hl7_tls_cert=scert, hl7_tls_key=skey))
        assert refused.outcome == "transient" and not listener.messages
        ckey, ccert = pki["client"]
        ok = send_messages(f"127.0.0.1:{port}+tls", messages, timeout_s=5,
                           settings=Settings(hl7_tls_ca=pki["ca"], hl7_tls_cert=ccert, hl7_tls_key=ckey))
        assert (ok.outcome, ok.accepted) == ("delivered", 2) and len(listener.messages) == 2
    finally:
        listener.stop()

    broken = send_messages(f"127.0.0.1:{free_port()}+tls", messages, timeout_s=5,
                           settings=Settings(hl7_tls_ca=pki["ca"], hl7_tls_cert=pki["ca"], hl7_tls_key=pki["ca"]))
    assert broken.outcome == "transient" and "HL7 TLS settings unusable" in broken.reason


def test_hl7_outbox_over_tls_with_a_client_certificate_and_a_wrong_ca(start_node, sqlite_url, pki):
    from sqlalchemy import select

    from ct_triage.contract import EmbeddedPublisher
    from db.models import Delivery
    from tests.test_ups import T0, seed
    from worker.tasks.context import WorkerContext
    from worker.tasks.deliver import deliver_outputs

    key, cert = pki["ris"]
    ckey, ccert = pki["client"]
    good_port, foreign_port = free_port(), free_port()
    good = MllpListener(good_port, tls=server_tls_context(cert, key, client_ca=pki["ca"])).start()
    skey, scert = pki["stranger_client"]  # a RIS whose certificate our CA did not sign
    foreign = MllpListener(foreign_port, tls=server_tls_context(scert, skey)).start()
    try:
        running = start_node(sqlite_url, hl7_ack_timeout_s=5,
                             hl7_destinations=[f"127.0.0.1:{good_port}+tls", f"127.0.0.1:{foreign_port}+tls"],
                             hl7_tls_ca=str(pki["ca"]), hl7_tls_cert=str(ccert), hl7_tls_key=str(ckey))
        seed(running, "1.2.826.0.1.3680043.8.498.31", category="CT-3", percent=60.0, arrived=T0)
        ctx = WorkerContext(running.settings, running.session_factory, EmbeddedPublisher())
        with running.session() as session:
            rows = {d.destination: d.id for d in session.scalars(select(Delivery).where(Delivery.channel == "hl7"))}
        assert set(rows) == {f"mllp://127.0.0.1:{good_port}+tls", f"mllp://127.0.0.1:{foreign_port}+tls"}
        assert deliver_outputs(ctx, rows[f"mllp://127.0.0.1:{good_port}+tls"]) == "delivered"
        assert deliver_outputs(ctx, rows[f"mllp://127.0.0.1:{foreign_port}+tls"]) == "failed"
        with running.session() as session:
            state = {d.destination: d for d in session.scalars(select(Delivery))}
        failed = state[f"mllp://127.0.0.1:{foreign_port}+tls"]
        assert failed.state == "failed" and failed.attempts == 1
        assert failed.last_error.startswith(f"TLS certificate of 127.0.0.1:{foreign_port} rejected: ")
        assert state[f"mllp://127.0.0.1:{good_port}+tls"].instances_sent == 2
        assert [str(m.segment("MSH")(9)(1)(1)) for m in good.messages] == ["ORM", "ORU"]
        assert not foreign.messages
    finally:
        good.stop()
        foreign.stop()
