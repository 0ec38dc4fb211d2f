"""The acknowledged-instances journal (dicom_node.journal): lines, overlap, removal."""

from __future__ import annotations

from pathlib import Path

from dicom_node import journal
from dicom_node.journal import Journal


def _file(root: Path, rel: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_a_line_appended_in_the_background_is_on_disk_when_its_future_is_done(tmp_path):
    j = Journal(tmp_path, 7)
    futures = [j.append_soon(f"instances/0{i}/a{i}.dcm") for i in range(20)]
    for f in futures:
        f.result(timeout=10)
    written = journal.read_paths(journal.segments(tmp_path, 7))
    assert sorted(written) == sorted(f"instances/0{i}/a{i}.dcm" for i in range(20))
    j.close()


def test_settled_counts_a_line_without_its_file_as_done_and_an_unindexed_file_as_not(tmp_path):
    _file(tmp_path, "instances/00/kept.dcm")
    assert journal.settled(["instances/00/kept.dcm", "instances/00/never-stored.dcm"],
                           {"instances/00/kept.dcm"}, tmp_path)
    assert not journal.settled(["instances/00/kept.dcm"], set(), tmp_path)


def test_a_finished_segment_is_removed_only_after_the_grace_and_when_settled(tmp_path, monkeypatch):
    _file(tmp_path, "instances/00/a.dcm")
    j = Journal(tmp_path, 3)
    j.append("instances/00/a.dcm")
    j.append("instances/00/failed-store.dcm")  # its store never linked a file
    monkeypatch.setattr(journal, "ROTATE_LINES", 1)
    indexed: set[str] = set()

    def all_indexed(paths):
        return journal.settled(paths, indexed, tmp_path)

    j.maintain(all_indexed)  # rotates: segment 0 is finished, too young to remove
    assert len(journal.segments(tmp_path, 3)) == 2
    monkeypatch.setattr(journal, "REMOVE_AFTER_S", 0.0)
    j.maintain(all_indexed)  # old enough, but a.dcm has no row yet
    assert (tmp_path / "journal" / "node-3.0.log").is_file()
    indexed.add("instances/00/a.dcm")
    j.maintain(all_indexed)
    assert not (tmp_path / "journal" / "node-3.0.log").exists()
    j.close(all_indexed)
    assert journal.segments(tmp_path, 3) == []
