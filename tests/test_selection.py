"""Series selection: which series of a study gets scored, and why the others do not."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from ct_triage.settings import Settings
from ct_triage_tools.phantom import write_phantom
from tests.support.data import LUNG_PET_CT, NY_SBU, need
from worker.scoring.load import read_series_headers
from worker.scoring.select import (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    Selection,
    SelectionRules,
    not_selected_reason,
    select_series,
)

RULES = SelectionRules()




def series(uid: str, *, slices: int = 40, kernel="FC51", thickness: float | None = 1.0,
           image_type=("ORIGINAL", "PRIMARY", "AXIAL"), modality="CT", sop_class=CT_IMAGE_STORAGE,
           orientation=(1, 0, 0, 0, 1, 0), spacing: float = 1.0) -> list[Dataset]:
    """Headers of a synthetic single-frame series."""
    headers = []
    for k in range(slices):
        ds = Dataset()
        ds.SOPClassUID = sop_class
        ds.SeriesInstanceUID = uid
        ds.Modality = modality
        ds.ImageType = list(image_type)
        if kernel is not None:
            ds.ConvolutionKernel = kernel
        if thickness is not None:
            ds.SliceThickness = thickness
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = [0, 0, -k * spacing]
        ds.SeriesNumber = 1
        ds.SeriesDescription = f"test {kernel}"
        headers.append(ds)
    return headers


def enhanced(uid: str, *, frames: int = 60, kernel="B70f", thickness=0.6) -> list[Dataset]:
    """Header of a synthetic Enhanced CT instance: kernel and geometry in functional groups."""
    ds = Dataset()
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.SeriesInstanceUID = uid
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.NumberOfFrames = frames
    reconstruction = Dataset()
    reconstruction.ConvolutionKernel = kernel
    measures = Dataset()
    measures.SliceThickness = thickness
    measures.PixelSpacing = [0.7, 0.7]
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    shared = Dataset()
    shared.CTReconstructionSequence = DicomSequence([reconstruction])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.CTImageFrameTypeSequence = DicomSequence([frame_type])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    return [ds]


def pick(*series_list: list[Dataset], rules: SelectionRules = RULES) -> Selection:
    return select_series({s[0].SeriesInstanceUID: s for s in series_list}, rules)


# -- real data ------------------------------------------------------------------------------


def test_real_philips_study_picks_the_lung_kernel():
    headers = {}
    for name in ("A0001-philips-B-5mm", "A0001-philips-L-5mm"):
        headers.update(read_series_headers(need(LUNG_PET_CT / name)))
    assert len(headers) == 2
    selection = select_series(headers, SelectionRules.from_settings(Settings()))
    chosen = headers[selection.series_instance_uid]
    assert chosen[0].ConvolutionKernel == "L"
    assert len(chosen) == 64
    (other,) = selection.rejected
    assert "not a lung kernel (B)" in selection.rejected[other]
    assert "selected" in selection.reason and "L (lung kernel)" in selection.reason


def test_real_siemens_study_picks_b70f():
    headers = {}
    for name in ("A0002-siemens-B40f-8mm", "A0002-siemens-B70f-8mm"):
        headers.update(read_series_headers(need(LUNG_PET_CT / name)))
    selection = select_series(headers, SelectionRules.from_settings(Settings()))
    assert headers[selection.series_instance_uid][0].ConvolutionKernel == "B70f"
    assert list(selection.rejected.values()) == [
        f"eligible but ranked below {selection.series_instance_uid}: not a lung kernel (B40f)"
    ]


def test_real_single_slices_are_not_eligible():
    headers = read_series_headers(need(NY_SBU))
    selection = select_series(headers, RULES)
    assert selection.series_instance_uid is None
    assert set(selection.rejected) == set(headers)
    reasons = list(selection.rejected.values())
    assert any(r.startswith("too few slices: 1") for r in reasons)
    assert any(r.startswith("derived image(s)") for r in reasons)  # the coronal reformats
    assert selection.reason.startswith("no eligible series (")
    assert all(uid in selection.reason for uid in headers)


def test_phantom_pair_picks_fc51(tmp_path):
    truth = write_phantom(tmp_path, 10.0, slices=24, rows=64, kernels=("FC07", "FC51"))
    selection = select_series(read_series_headers(tmp_path), RULES)
    assert selection.series_instance_uid == truth["series_by_kernel"]["FC51"]


# -- ranking ------------------------------------------------------------------------------------


def test_lung_kernel_beats_thinner_soft_kernel():
    selection = pick(series("1.1", kernel="FC07", thickness=0.5), series("1.2", kernel="FC51", thickness=1.0))
    assert selection.series_instance_uid == "1.2"
    assert selection.rejected["1.1"].endswith("not a lung kernel (FC07)")


def test_thinnest_lung_series_wins():
    selection = pick(series("1.1", thickness=5.0), series("1.2", thickness=1.0), series("1.3", thickness=2.0))
    assert selection.series_instance_uid == "1.2"
    assert "thicker slices (5 mm vs 1 mm)" in selection.rejected["1.1"]
    assert "preferred over 2 other eligible series" in selection.reason


def test_more_slices_break_a_thickness_tie():
    selection = pick(series("1.1", slices=40), series("1.2", slices=80))
    assert selection.series_instance_uid == "1.2"
    assert "fewer slices (40 vs 80)" in selection.rejected["1.1"]


def test_full_tie_goes_to_the_lowest_uid_whatever_the_order():
    a, b = series("1.2.9"), series("1.2.10")
    first = select_series({"1.2.9": a, "1.2.10": b}, RULES)
    second = select_series({"1.2.10": b, "1.2.9": a}, RULES)
    assert first.series_instance_uid == second.series_instance_uid == "1.2.10"
    assert "tie broken by Series Instance UID" in first.rejected["1.2.9"]


def test_thickness_falls_back_to_position_spacing():
    selection = pick(series("1.1", thickness=None, spacing=0.8), series("1.2", thickness=None, spacing=2.0))
    assert selection.series_instance_uid == "1.1"
    assert "thicker slices (2 mm vs 0.8 mm)" in selection.rejected["1.2"]


@pytest.mark.parametrize("kernel, is_lung", [
    ("fc51", True), ("LUNG", True), (["Br60", "3"], True), ("B70F", True),
    ("B70s", False), ("FC5", False), ("STANDARD", False), (None, False),
])
def test_kernel_match_is_case_insensitive_and_exact(kernel, is_lung):
    # the candidate is thicker: it wins only as a lung kernel
    selection = pick(series("1.1", kernel=kernel, thickness=2.0), series("1.2", kernel="SOFT", thickness=1.0))
    assert (selection.series_instance_uid == "1.1") == is_lung


def test_enhanced_ct_kernel_and_frames_come_from_functional_groups():
    selection = pick(enhanced("2.1", frames=60, kernel="B70f", thickness=0.6),
                     series("2.2", kernel="FC51", thickness=1.0))
    assert selection.series_instance_uid == "2.1"
    assert "60 slices" in selection.reason
    too_few = pick(enhanced("2.3", frames=10))
    assert too_few.rejected["2.3"].startswith("too few slices: 10")


# -- eligibility ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, reason", [
    ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "localizer image(s)"),
    ({"image_type": ("DERIVED", "SECONDARY", "AXIAL")}, "derived image(s)"),
    ({"image_type": ("DERIVED", "SECONDARY", "REFORMATTED")}, "derived image(s)"),
    ({"image_type": ("DERIVED", "PRIMARY", "MIP")}, "derived image(s)"),
    ({"image_type": ("ORIGINAL", "SECONDARY", "REFORMATTED")}, "reformatted image(s)"),
    ({"image_type": ("ORIGINAL", "SECONDARY", "MPR")}, "multiplanar reformat"),
    ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "localizer image(s)"),
    ({"image_type": ("ORIGINAL", "SECONDARY", "SCREEN SAVE")}, "screen capture"),
    ({"image_type": ("ORIGINAL", "PRIMARY", "DOSE_INFO")}, "dose report"),
    ({"image_type": ("ORIGINAL", "OTHER", "AXIAL")}, "lacks PRIMARY or SECONDARY"),
    ({"sop_class": "1.2.840.10008.5.1.4.1.1.88.67"}, "is not a CT image"),
    ({"modality": "MR"}, "modality MR, not CT"),
    ({"sop_class": "1.2.840.10008.5.1.4.1.1.7"}, "Secondary Capture Image Storage"),
    ({"orientation": (1, 0, 0, 0, 0, -1)}, "not axial"),
    ({"slices": 19}, "too few slices: 19 (at least 20 needed)"),
])
def test_ineligible_series_are_named_with_their_reason(kwargs, reason):
    selection = pick(series("9.1", **kwargs))
    assert selection.series_instance_uid is None
    assert reason in selection.rejected["9.1"]
    assert f"9.1: {selection.rejected['9.1']}" in selection.reason


def test_none_eligible_reason_names_each_series():
    selection = pick(series("3.1", modality="MR"), series("3.2", slices=3), series("3.3", kernel="FC51",
                     image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")))
    assert selection.series_instance_uid is None
    for uid in ("3.1", "3.2", "3.3"):
        assert uid in selection.reason
    assert select_series({}, RULES).reason == "no series in the study"


def test_an_ineligible_lung_series_does_not_beat_an_eligible_soft_one():
    selection = pick(series("4.1", kernel="FC51", slices=5), series("4.2", kernel="FC07"))
    assert selection.series_instance_uid == "4.2"
    assert selection.rejected["4.1"].startswith("too few slices")


def test_rules_from_settings():
    settings = Settings(lung_kernels=["XR9"], min_slices=5)
    rules = SelectionRules.from_settings(settings)
    assert rules.min_slices == 5 and rules.lung_kernels == ("XR9",)
    selection = pick(series("5.1", kernel="FC51", slices=6), series("5.2", kernel="xr9", slices=6, thickness=3.0),
                     rules=rules)
    assert selection.series_instance_uid == "5.2"
    assert SelectionRules.from_settings(Settings()).lung_kernels == tuple(Settings().lung_kernels)


# -- ORIGINAL/SECONDARY axial reconstructions (issue 10) ---------------------------------------


def test_original_secondary_axial_is_eligible_after_primary():
    only = pick(series("5.1", image_type=("ORIGINAL", "SECONDARY", "AXIAL")))
    assert only.series_instance_uid == "5.1"
    assert "ORIGINAL/SECONDARY" in only.reason
    # a PRIMARY series wins even with a soft kernel and thicker slices
    both = pick(series("5.1", image_type=("ORIGINAL", "SECONDARY", "AXIAL"), kernel="FC51", thickness=0.5),
                series("5.2", kernel="FC07", thickness=2.0))
    assert both.series_instance_uid == "5.2"
    assert both.rejected["5.1"] == ("eligible but ranked below 5.2: ORIGINAL/SECONDARY ranks after "
                                    "ORIGINAL/PRIMARY")
    # among SECONDARY series the kernel and thickness preferences hold
    two = pick(series("6.1", image_type=("ORIGINAL", "SECONDARY", "AXIAL"), kernel="FC07", thickness=1.0),
               series("6.2", image_type=("ORIGINAL", "SECONDARY", "AXIAL"), kernel="FC51", thickness=2.0))
    assert two.series_instance_uid == "6.2"
    assert "not a lung kernel (FC07)" in two.rejected["6.1"]


def test_a_series_mixing_primary_and_secondary_ranks_as_secondary():
    mixed = series("7.1")
    mixed[3].ImageType = ["ORIGINAL", "SECONDARY", "AXIAL"]
    selection = pick(mixed, series("7.2", kernel="FC07"))
    assert selection.series_instance_uid == "7.2"


def test_none_eligible_reason_lists_number_and_description():
    reformat = series("8.1", image_type=("DERIVED", "SECONDARY", "REFORMATTED"))
    for ds in reformat:
        ds.SeriesNumber = 602
        ds.SeriesDescription = "Cor\x1b[31m MPR 3mm"
    selection = pick(reformat, series("8.2", modality="MR"))
    assert selection.series_instance_uid is None
    assert 'series 602 "Cor [31m MPR 3mm" 8.1: derived image(s)' in selection.reason
    assert "8.2: modality MR, not CT" in selection.reason
    assert "\x1b" not in selection.reason


def _rewritten(tmp_path: Path, name: str, image_type: list[str]) -> Path:
    """A copy of a real series with every instance's ImageType rewritten."""
    import pydicom

    out = tmp_path / f"{name}-{'-'.join(image_type)}"
    out.mkdir()
    for f in sorted(need(LUNG_PET_CT / name).iterdir()):
        ds = pydicom.dcmread(f)
        ds.ImageType = image_type
        ds.save_as(out / f.name)
    return out


def test_real_series_rewritten_to_original_secondary_axial_is_picked(tmp_path):
    path = _rewritten(tmp_path, "A0002-siemens-B70f-8mm", ["ORIGINAL", "SECONDARY", "AXIAL"])
    headers = read_series_headers(path)
    selection = select_series(headers, SelectionRules.from_settings(Settings()))
    assert selection.series_instance_uid == next(iter(headers))
    assert "ORIGINAL/SECONDARY, B70f (lung kernel), 8 mm, 30 slices" in selection.reason


def test_real_series_rewritten_to_derived_reformat_is_not_picked(tmp_path):
    path = _rewritten(tmp_path, "A0002-siemens-B70f-8mm", ["DERIVED", "SECONDARY", "REFORMATTED"])
    headers = read_series_headers(path)
    selection = select_series(headers, SelectionRules.from_settings(Settings()))
    assert selection.series_instance_uid is None
    (uid,) = headers
    assert selection.rejected[uid].startswith("derived image(s)")
    assert "DERIVED/SECONDARY/REFORMATTED" in selection.reason
    # beside the soft-kernel PRIMARY series of the same study, that one is picked
    headers.update(read_series_headers(need(LUNG_PET_CT / "A0002-siemens-B40f-8mm")))
    selection = select_series(headers, SelectionRules.from_settings(Settings()))
    assert headers[selection.series_instance_uid][0].ConvolutionKernel == "B40f"


def index_row(number, description, kernel, thickness, instances=40):
    from db.models import Series

    return Series(series_instance_uid=f"1.2.3.{number}", series_number=number, series_description=description,
                  convolution_kernel=kernel, slice_thickness=thickness, instance_count=instances)


def test_not_selected_reason_names_the_kernels_in_words():
    lung, soft = index_row(2, "LUNG 1.0", "L", 1.0), index_row(3, "SOFT\r\nFAKE LINE", "B", 1.0)
    assert not_selected_reason(soft, lung) == ('not selected: kernel B is not a lung kernel; '
                                               'series 2 "LUNG 1.0" (lung kernel L, 1 mm) scored')
    # configured lung kernels rule; text from the headers is cleaned
    reason = not_selected_reason(lung, soft, ["B"])
    assert reason.startswith("not selected: kernel L is not a lung kernel; series 3")
    assert "\n" not in reason and "SOFT\\x0d\\x0aFAKE LINE" in reason
    thick, thin = index_row(4, None, "FC51", 5.0), index_row(5, None, "FC51", 1.25, 200)
    assert not_selected_reason(thick, thin) == ("not selected: thicker slices (5 mm vs 1.25 mm); "
                                                "series 5 (lung kernel FC51, 1.25 mm) scored")
    few = index_row(6, None, "FC51", 1.25, 30)
    assert not_selected_reason(few, thin).startswith("not selected: fewer slices (30 vs 200)")
    assert not_selected_reason(index_row(7, None, "FC51", 1.25, 200), thin).startswith(
        "not selected: ranked lower or not eligible")
