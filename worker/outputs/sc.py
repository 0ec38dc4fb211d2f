"""Secondary Capture series with the burned-in pictures.

One RGB 8-bit Secondary Capture Image (1.2.840.10008.5.1.4.1.1.7) per source slice that
has lesion boxes, plus one summary image (coronal overview + text panel). Built with
highdicom's :class:`highdicom.sc.SCImage` from the source instance, then completed:

- Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial Study
  attributes copied from the source (highdicom ``copy_patient_and_study_information``).
- New series: SeriesInstanceUID/SOPInstanceUIDs from :func:`worker.outputs.uids.output_uid`
  (source series UID, result version, role, index), SeriesNumber ``9000 + version`` by
  default, SeriesDescription starting "AI COVID-19 triage".
- Modality ``OT``: the SC IOD allows any modality, but these are not CT acquisitions, and
  "CT" makes viewers apply CT hanging protocols/window presets and makes CT-only
  queries (and our own series selection, which wants CT ORIGINAL\\PRIMARY) pick them up.
  ``OT`` is what highdicom writes for SC and what PACS show as a separate
  "other" series next to the CT.
- ImageType ``DERIVED\\SECONDARY``; ConversionType ``WSD`` (workstation);
  BurnedInAnnotation ``YES``; DerivationDescription; SourceImageSequence to the source
  slice(s) with purpose (121322, DCM, "Source image for image processing operation").
- ContributingEquipmentSequence: the scanner (acquisition equipment, from the source),
  ct-triage (109102, DCM, "Processing Equipment", SoftwareVersions = ct-triage version
  and model version) and highdicom (the library).
- Every date/time we write comes from ``created_at`` (see
  :func:`worker.outputs.base.resolve_created_at`),
  never from the clock, so a retry of the same result version is byte-identical.
- Pixel encoding (``CT_TRIAGE_SC_COMPRESSION``, :data:`COMPRESSIONS`): ``none``
  (Explicit VR Little Endian, RGB), ``rle`` (RLE Lossless, RGB; lossless) or
  ``jpeg-baseline`` (JPEG Baseline 8-bit, YBR_FULL_422, quality :data:`JPEG_QUALITY`;
  LossyImageCompression 01 with its ratio and method ISO_10918_1). Measured on a
  300-slice CT-3 phantom (bench/outputs_bench.py): see docs/outputs.md for the numbers that
  chose the default (jpeg-baseline: 24 MB instead of 210 MB, rendered by Orthanc).
- Which slices (``CT_TRIAGE_SC_SLICES``): every slice with a lesion box, or the N slices
  with the largest boxed lesion area (ties: lower slice index), always plus the summary.

Cost: highdicom's ``SCImage`` constructor validates the whole IOD (tens of ms per image).
It runs twice per series: once for the summary and once for the first slice image,
which becomes the *template*; every further slice image is a copy of the template that
shares its unchanged data elements and gets its own SOP Instance UID, Instance Number,
Patient Orientation, Pixel Spacing, Source Image Sequence, Derivation Description and
pixels. A slice whose patient/study attributes or image size differ from the template's
source (never in a well-formed series) goes through highdicom again. The caption is
rendered once per image width (:func:`worker.outputs.render.caption_overlay`) and
composited onto each slice.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless

from ct_triage import __version__
from worker.outputs import render
from worker.outputs.base import (
    MANUFACTURER,
    check_series_number,
    contributing_equipment,
    freeze_times,
    plain_text,
    resolve_created_at,
    series_description,
    validate_inputs,
)
from worker.outputs.trend import with_comparison
from worker.outputs.uids import output_uid
from worker.scoring.result import ScoreResult

SC_SERIES_NUMBER_BASE = 9000
SOURCE_IMAGE_PURPOSE = hd.sr.CodedConcept("121322", "DCM", "Source image for image processing operation")
#: ``CT_TRIAGE_SC_COMPRESSION`` values and their transfer syntaxes.
COMPRESSIONS = {"none": ExplicitVRLittleEndian, "rle": RLELossless, "jpeg-baseline": JPEGBaseline8Bit}
#: JPEG quality (Pillow scale 1..95) of ``jpeg-baseline``: about 90 KB per 512x512 slice
#: (8.5x smaller than RGB) at 34-35 dB PSNR on the phantom's lung-window slices.
JPEG_QUALITY = 90

# Patient / study attributes the template copies from its source slice; a slice whose
# values differ from those is built by highdicom instead of cloned.
_SHARED_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "StudyInstanceUID", "StudyID", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription", "SpecificCharacterSet", "BodyPartExamined", "Rows", "Columns",
)



def patient_orientation(ds: Dataset) -> tuple[str, str]:
    """PatientOrientation letters (row direction, column direction) from ImageOrientationPatient."""
    try:
        iop = [float(v) for v in ds.ImageOrientationPatient]
    except (AttributeError, TypeError, ValueError):
        return ("L", "P")  # axial, the usual supine orientation
    return (_direction_letters(iop[:3]), _direction_letters(iop[3:]))


def _direction_letters(vector: Sequence[float]) -> str:
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    parts = []
    for axis in np.argsort(-np.abs(np.asarray(vector)))[:3]:
        value = vector[axis]
        if abs(value) < 1e-3:
            continue
        # DICOM patient axes: +x = left, +y = posterior, +z = head
        parts.append(letters[axis][0] if value > 0 else letters[axis][1])
    return "".join(parts[:1]) if parts else "L"


def _source_item(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [SOURCE_IMAGE_PURPOSE]
    return item


def _build_sc(
    *,
    ref: Dataset,
    pixels: np.ndarray,
    sources: Sequence[Dataset],
    result: ScoreResult,
    series_uid: str,
    series_number: int,
    sop_uid: str,
    instance_number: int,
    orientation: tuple[str, str],
    pixel_spacing: tuple[float, float] | None,
    derivation: str,
    comments: str,
    created_at: dt.datetime,
    result_version: int,
) -> Dataset:
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        # cast: highdicom annotates from_ref_dataset's pixel_spacing as ints (its __init__: floats, in mm)
        pixel_spacing=cast("tuple[int, int] | None", pixel_spacing),
        patient_orientation=orientation,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[contributing_equipment(result, created_at, derivation)],
        series_description=series_description("images", result_version),
        manufacturer_model_name=MANUFACTURER,
        software_versions=__version__,
        content_date=created_at.date(),
        content_time=created_at.time(),
        series_date=created_at.date(),
        series_time=created_at.time(),
    )
    sc.copy_patient_and_study_information(ref)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = plain_text(derivation)[:1024]
    sc.SourceImageSequence = [_source_item(ds) for ds in sources]
    sc.ImageComments = plain_text(comments)[:10240]
    # General Series Laterality is 2C on paired body parts; with BodyPartExamined CHEST
    # (unpaired) it is absent. Without a body part we cannot tell: empty = unknown.
    body_part = str(ref.get("BodyPartExamined", "") or "")
    if not body_part and result.status == "scored":
        body_part = "CHEST"  # we only score chest CTs
    if body_part:
        sc.BodyPartExamined = body_part[:16]
    else:
        sc.Laterality = ""
    if any(str(ds.get("LossyImageCompression", "")) == "01" for ds in sources):
        sc.LossyImageCompression = "01"  # once lossy, always flagged lossy (PS3.3 C.7.6.1.1.5)
    freeze_times(sc, created_at)
    return sc


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    spacing = ds.get("PixelSpacing")
    if spacing and len(spacing) == 2:
        return (float(spacing[0]), float(spacing[1]))
    return None


def result_comment(result: ScoreResult) -> str:
    """One-line result text (ImageComments of the summary, TEXT in the SR)."""
    if result.status == "scored":
        return (
            f"{result.category}, lung involvement {render.format_percent(result.involvement_percent)} "
            f"(right {render.format_percent(result.involvement_percent_right)}, "
            f"left {render.format_percent(result.involvement_percent_left)}), "
            f"priority {result.priority}. {render.NOT_FOR_DIAGNOSTIC_USE}"
        )
    status = "not applicable" if result.status == "not_applicable" else "scoring failed"
    return (f"Not scored ({status}): {result.reason or 'no reason given'}. Priority {result.priority}. "
            f"{render.NOT_FOR_DIAGNOSTIC_USE}")


def check_compression(compression: str) -> str:
    if not isinstance(compression, str) or compression.strip().lower() not in COMPRESSIONS:
        raise ValueError(f"argument 'compression' must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    return compression.strip().lower()


def check_max_slices(max_slices) -> int | None:
    if max_slices is None:
        return None
    if isinstance(max_slices, bool) or not isinstance(max_slices, int) or max_slices < 1:
        raise ValueError(f"argument 'max_slices' must be None (all lesion slices) or an int >= 1, got {max_slices!r}")
    return max_slices


def encode_pixels(ds: Dataset, rgb: np.ndarray, compression: str) -> None:
    """Set ``ds``'s Pixel Data (and the attributes that go with it) from an RGB array.

    ``none``: native RGB; ``rle``: RLE Lossless of the RGB planes; ``jpeg-baseline``:
    Pillow's baseline JPEG, YCbCr with 4:2:2 chroma subsampling, quality
    :data:`JPEG_QUALITY`, PhotometricInterpretation YBR_FULL_422 (PS3.5 8.2.1) and the
    lossy-compression attributes (PS3.3 C.7.6.1.1.5). 4:4:4 would be sharper (38.5 dB
    instead of 34-35 dB at the same size) but needs YBR_FULL, which the SC IOD does not
    allow with JPEG (dciodvfy: "Unrecognized enumerated value"); an RGB JPEG (no colour
    transform) is 2.5 times larger.
    Same array, same bytes.
    """
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    rows, cols = rgb.shape[:2]
    syntax = COMPRESSIONS[compression]
    photometric = "RGB"
    lossy_ratio = None
    if compression == "none":
        data = rgb.tobytes()
    elif compression == "rle":
        from highdicom.frame import encode_frame

        data = encapsulate([encode_frame(rgb, RLELossless, 8, 8, "RGB", 0, 0)])
    else:
        buffer = io.BytesIO()
        Image.fromarray(rgb, mode="RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=1,
                                              optimize=False, progressive=False)
        frame = buffer.getvalue()
        data = encapsulate([frame])
        photometric = "YBR_FULL_422"  # the SC IOD allows RGB or YBR_FULL_422 here, not YBR_FULL
        lossy_ratio = rgb.size / len(frame)
    _set(ds, "PhotometricInterpretation", photometric)
    _set(ds, "PlanarConfiguration", 0)
    _set(ds, "Rows", rows)
    _set(ds, "Columns", cols)
    if syntax.is_encapsulated:
        ds[0x7FE00010] = DataElement(0x7FE00010, "OB", data, is_undefined_length=True)
    else:
        ds[0x7FE00010] = DataElement(0x7FE00010, "OB", data)
    if lossy_ratio is not None:
        _set(ds, "LossyImageCompression", "01")
        _set(ds, "LossyImageCompressionRatio", [f"{lossy_ratio:.2f}"])
        _set(ds, "LossyImageCompressionMethod", ["ISO_10918_1"])
    meta = FileMetaDataset()
    for elem in ds.file_meta:
        meta.add(elem)
    meta[0x00020010] = DataElement(0x00020010, "UI", syntax)
    ds.file_meta = meta


def _set(ds: Dataset, keyword: str, value) -> None:
    """Replace (never mutate) a data element: template clones share unchanged elements."""
    tag = tag_for_keyword(keyword)
    if tag is None:  # pragma: no cover - keywords are ours
        raise KeyError(keyword)
    ds[tag] = DataElement(tag, dictionary_VR(tag), value)


def _clone(template: Dataset) -> Dataset:
    """A new Dataset sharing ``template``'s data elements (replace them with :func:`_set`)."""
    clone = Dataset(dict(template._dict))
    meta = FileMetaDataset()
    for elem in template.file_meta:
        meta.add(elem)
    clone.file_meta = meta
    clone.preamble = template.preamble
    return clone


def _fits_template(ds: Dataset, ref: Dataset) -> bool:
    return all(ds.get(k) == ref.get(k) for k in _SHARED_KEYWORDS) and str(ds.get("LossyImageCompression", "")) == str(
        ref.get("LossyImageCompression", "")
    )


def _slice_derivation(slice_index: int, n_boxes: int, result: ScoreResult) -> str:
    return (
        f"Lung window (WL -600 HU, WW 1500 HU) of source slice {slice_index + 1} with {n_boxes} AI "
        f"lesion box(es) burned in, by {result.model} {result.model_version} "
        f"(ct-triage {__version__}). {render.NOT_FOR_DIAGNOSTIC_USE}"
    )


def select_slices(result: ScoreResult, max_slices: int | None) -> list[int]:
    """Slice indices that get an image: all with a box, or the ``max_slices`` largest.

    "Largest" is the boxed area (sum of box pixel areas) on the slice; ties go to the
    lower index. The result is in slice order.
    """
    area: dict[int, int] = {}
    for box in result.boxes:
        area[box.slice_index] = area.get(box.slice_index, 0) + (box.row_max - box.row_min + 1) * (
            box.col_max - box.col_min + 1
        )
    chosen = sorted(area)
    if max_slices is not None and len(chosen) > max_slices:
        chosen = sorted(sorted(area, key=lambda k: (-area[k], k))[:max_slices])
    return chosen


def build_secondary_capture_series(
    source_datasets: Sequence[Dataset],
    result: ScoreResult,
    result_version: int,
    *,
    series_number: int | None = None,
    created_at: dt.datetime | None = None,
    compression: str = "none",
    max_slices: int | None = None,
) -> list[Dataset]:
    """Build the SC series for one result version.

    Args:
        source_datasets: the scored series' CT instances with pixel data, in the order of
            ``result.source_sop_instance_uids`` (sorted along the slice normal).
        result: the scoring result; for ``not_applicable``/``failed`` only the summary
            image (stating the status and reason, priority MEDIUM) is built.
        result_version: 1, 2, ... (a new version supersedes the previous outputs).
        series_number: default ``9000 + result_version``.
        created_at: timestamp written as content/creation/series date and time; see
            :func:`worker.outputs.base.resolve_created_at` for the deterministic default.
        compression: ``none``, ``rle`` or ``jpeg-baseline`` (:data:`COMPRESSIONS`).
        max_slices: ``None`` = every slice with a lesion box; N = the N slices with the
            largest boxed lesion area (:func:`select_slices`).

    Returns:
        ``[summary, slice images...]``: the summary is InstanceNumber 1, the lesion
        slices follow in slice order. Same inputs, same bytes.

    Raises:
        TypeError/ValueError naming the bad argument.
    """
    datasets = validate_inputs(source_datasets, result, result_version)
    compression = check_compression(compression)
    max_slices = check_max_slices(max_slices)
    series = _SeriesIds(
        source_series=str(datasets[0].SeriesInstanceUID),
        series_number=check_series_number(series_number, SC_SERIES_NUMBER_BASE + result_version),
        result_version=result_version,
    )
    when = resolve_created_at(created_at, datasets)
    out = [_build_summary(datasets, result, series, when, compression)]
    if result.status == "scored":
        out.extend(_build_slice_images(datasets, result, series, when, compression, max_slices))
    return out


@dataclass(frozen=True)
class _SeriesIds:
    """What every image of one output series shares: its source series, number and version."""

    source_series: str
    series_number: int
    result_version: int

    @property
    def series_uid(self) -> str:
        return output_uid(self.source_series, self.result_version, "sc-series")

    def sop_uid(self, index: int) -> str:
        """SOP Instance UID of the summary (index 0) or of source slice ``index - 1``."""
        return output_uid(self.source_series, self.result_version, "sc-instance", index)


def _build_summary(
    datasets: Sequence[Dataset], result: ScoreResult, series: _SeriesIds, when: dt.datetime, compression: str
) -> Dataset:
    """The summary image (InstanceNumber 1): coronal overview, result panel, comparison."""
    summary_pixels = with_comparison(render.render_summary(datasets, result), result.comparison)  # issue 12
    row_letters, _ = patient_orientation(datasets[0])
    summary = _build_sc(
        ref=datasets[0],
        pixels=summary_pixels,
        sources=datasets,
        result=result,
        series_uid=series.series_uid,
        series_number=series.series_number,
        sop_uid=series.sop_uid(0),
        instance_number=1,
        orientation=(row_letters, "F"),
        pixel_spacing=None,  # overview + text panel: no single meaningful spacing
        derivation=(
            f"Coronal mean-intensity projection of the source series with AI lesion regions in red and "
            f"a result panel, by {result.model} {result.model_version} (ct-triage {__version__}). "
            f"{render.NOT_FOR_DIAGNOSTIC_USE}"
        ),
        comments=result_comment(result),
        created_at=when,
        result_version=series.result_version,
    )
    if compression != "none":
        encode_pixels(summary, summary_pixels, compression)
    return summary


def _build_slice_images(
    datasets: Sequence[Dataset],
    result: ScoreResult,
    series: _SeriesIds,
    when: dt.datetime,
    compression: str,
    max_slices: int | None,
) -> list[Dataset]:
    """One image per selected lesion slice (InstanceNumber 2, 3, ...), in slice order.

    The first goes through highdicom and becomes the template; the others are clones
    of it (:func:`_clone_slice`) unless their source does not fit the template's.
    """
    by_slice: dict[int, list] = {}
    for box in result.boxes:
        by_slice.setdefault(box.slice_index, []).append(box)
    caption = render.caption_text(result)
    overlays: dict[int, render.CaptionOverlay] = {}
    template: Dataset | None = None
    template_ref: Dataset | None = None
    out: list[Dataset] = []
    for number, slice_index in enumerate(select_slices(result, max_slices), start=2):
        ds = datasets[slice_index]
        boxes = by_slice[slice_index]
        cols = int(ds.Columns)
        if cols not in overlays:
            overlays[cols] = render.caption_overlay(caption, cols)
        pixels = render.render_slice(ds, boxes, result, overlay=overlays[cols])
        sop_uid = series.sop_uid(slice_index + 1)
        derivation = plain_text(_slice_derivation(slice_index, len(boxes), result))[:1024]
        if template is None or template_ref is None or not _fits_template(ds, template_ref):
            image = _build_sc(
                ref=ds,
                pixels=pixels,
                sources=[ds],
                result=result,
                series_uid=series.series_uid,
                series_number=series.series_number,
                sop_uid=sop_uid,
                instance_number=number,
                orientation=patient_orientation(ds),
                pixel_spacing=_pixel_spacing(ds),
                derivation=derivation,
                comments=caption,
                created_at=when,
                result_version=series.result_version,
            )
            if compression != "none":
                encode_pixels(image, pixels, compression)
            if template is None:
                template, template_ref = image, ds
                list(template)  # convert raw elements now, so every clone shares the converted objects
        else:
            image = _clone_slice(template, ds, sop_uid, number, derivation, pixels, compression)
        out.append(image)
    return out


def _clone_slice(
    template: Dataset,
    ds: Dataset,
    sop_uid: str,
    number: int,
    derivation: str,
    pixels: np.ndarray,
    compression: str,
) -> Dataset:
    """A slice image for source ``ds`` made from the template: only the per-slice elements differ."""
    image = _clone(template)
    _set(image, "SOPInstanceUID", sop_uid)
    image.file_meta[0x00020003] = DataElement(0x00020003, "UI", sop_uid)
    _set(image, "InstanceNumber", number)
    _set(image, "PatientOrientation", list(patient_orientation(ds)))
    spacing = _pixel_spacing(ds)
    if spacing is not None:
        _set(image, "PixelSpacing", list(spacing))
    elif "PixelSpacing" in image:
        del image.PixelSpacing
    _set(image, "DerivationDescription", derivation)
    _set(image, "SourceImageSequence", DicomSequence([_source_item(ds)]))
    encode_pixels(image, pixels, compression)
    image._ct_template = template  # lets worker.outputs.stored.encode reuse the shared elements' bytes
    return image


__all__ = [
    "build_secondary_capture_series",
    "COMPRESSIONS",
    "encode_pixels",
    "select_slices",
    "result_comment",
]
