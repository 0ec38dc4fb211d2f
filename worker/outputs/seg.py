"""DICOM Segmentation of a result: the masks viewers overlay.

One Segmentation instance (1.2.840.10008.5.1.4.1.1.66.4, highdicom ``Segmentation``),
BINARY (bit-packed, one bit per voxel), on the source series' grid, referencing every
source instance. Segments, numbered in this order when present:

1. "Right lung" - category Anatomical Structure (91723000, SCT), type Right lung
   (3341006, SCT); lesions included (the lung the percentages are measured on).
2. "Left lung" - type Left lung (44029006, SCT).
3. "Lesions" - category Morphologically Abnormal Structure (49755003, SCT), type Lesion
   (52988006, SCT), anatomic region Lung (39607008, SCT): what the involvement counts.
   When the scorer tells ground glass and consolidation apart (``ResultMasks.ggo`` /
   ``.consolidation``), two segments replace it: "Ground glass opacity" (112120, DCM) and
   "Consolidation" (Lung consolidation, 95436008, SCT).

A segment with no voxel at all is left out (a SEG segment must have frames), so the
numbers are returned by :func:`segment_numbers` for the SR to reference. Each segment
names the algorithm (AUTOMATIC; family Artificial Intelligence (123110, DCM); name and
version of the model). Segments overlap (lesions lie inside the lungs):
SegmentsOverlap YES.

Masks come from :class:`worker.scoring.masks.ResultMasks`: the working grid the numbers
were measured on, mapped back to the original grid by nearest neighbour.

Encoding: the standard allows BINARY frames only uncompressed or JPEG 2000 Lossless;
JPEG 2000 costs about 4 ms per 512x512 frame here (about 3 s for the 700-800 frames of a
300-slice study), uncompressed is 32 KB per frame (about 25 MB). So the file is written
in **Deflated Explicit VR Little Endian** (1.2.840.10008.1.2.1.99, PS3.5 A.5), which
the standard allows for any SOP class: zlib of the bit-packed frames takes about 0.05 ms
per frame and shrinks the SEG to 1-2 MB. ``compression="none"`` writes Explicit VR
Little Endian for PACS that refuse deflate (the sender also falls back by itself).

Cost: highdicom's constructor is run once on a one-pixel template (one slice); the
per-frame functional groups, the references to every source instance and the pixel data
are then filled in here (highdicom's full constructor spends seconds on an overlap
check over the whole 4-D array and per-frame validation). UIDs are deterministic
(``seg-series``, ``seg-instance``, ``seg-dimension``), dates come from ``created_at``:
a retry is byte-identical.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from ct_triage import __version__
from worker.outputs import base
from worker.outputs.uids import output_uid
from worker.scoring.masks import ResultMasks
from worker.scoring.result import ScoreResult

SEG_SERIES_NUMBER_BASE = 9200
SEG_COMPRESSIONS = {"deflate": DeflatedExplicitVRLittleEndian, "none": ExplicitVRLittleEndian}

ANATOMICAL_STRUCTURE = hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure")
ABNORMAL_STRUCTURE = hd.sr.CodedConcept("49755003", "SCT", "Morphologically Abnormal Structure")
LUNG = hd.sr.CodedConcept("39607008", "SCT", "Lung")
RIGHT_LUNG = hd.sr.CodedConcept("3341006", "SCT", "Right lung")
LEFT_LUNG = hd.sr.CodedConcept("44029006", "SCT", "Left lung")
LESION = hd.sr.CodedConcept("52988006", "SCT", "Lesion")
GROUND_GLASS = hd.sr.CodedConcept("112120", "DCM", "Ground glass opacity")
CONSOLIDATION = hd.sr.CodedConcept("95436008", "SCT", "Lung consolidation")


@dataclass(frozen=True)
class SegmentSpec:
    key: str  # "right", "left", "lesion", "ggo", "consolidation"
    label: str
    category: hd.sr.CodedConcept
    property_type: hd.sr.CodedConcept
    region: hd.sr.CodedConcept | None


SPECS = {
    "right": SegmentSpec("right", "Right lung", ANATOMICAL_STRUCTURE, RIGHT_LUNG, None),
    "left": SegmentSpec("left", "Left lung", ANATOMICAL_STRUCTURE, LEFT_LUNG, None),
    "lesion": SegmentSpec("lesion", "Lesions", ABNORMAL_STRUCTURE, LESION, LUNG),
    "ggo": SegmentSpec("ggo", "Ground glass opacity", ABNORMAL_STRUCTURE, GROUND_GLASS, LUNG),
    "consolidation": SegmentSpec("consolidation", "Consolidation", ABNORMAL_STRUCTURE, CONSOLIDATION, LUNG),
}


def _segment_keys(masks: ResultMasks) -> list[str]:
    if masks.ggo is not None and masks.consolidation is not None:
        return ["right", "left", "ggo", "consolidation"]
    return ["right", "left", "lesion"]


def _working_mask(masks: ResultMasks, key: str) -> np.ndarray:
    if key == "right":
        return masks.lung & ~masks.left
    if key == "left":
        return masks.left
    arr = getattr(masks, key)
    assert arr is not None
    return arr


def _original_segment(masks: ResultMasks, key: str, k: int) -> np.ndarray:
    if key == "right":
        return masks.original_slice("lung", k) & ~masks.original_slice("left", k)
    return masks.original_slice(key, k)


def segment_numbers(masks: ResultMasks) -> dict[str, int]:
    """Segment number per key ("right", "left", "lesion" or "ggo"/"consolidation") of the
    segments :func:`build_segmentation` writes (segments without voxels are left out)."""
    numbers: dict[str, int] = {}
    for key in _segment_keys(masks):
        if _working_mask(masks, key).any():
            numbers[key] = len(numbers) + 1
    return numbers


def _frames(masks: ResultMasks, key: str) -> list[int]:
    """Original slice indices on which segment ``key`` has voxels."""
    mask = _working_mask(masks, key)
    fz = masks.factor[0]
    present = np.flatnonzero(mask.any(axis=(1, 2)))
    slices = (present[:, None] * fz + np.arange(fz)[None, :]).ravel()
    return [int(k) for k in slices if k < masks.original_shape[0]]


_TAGS: dict[str, tuple[BaseTag, str]] = {}


def _dataset(**elements) -> Dataset:
    """A Dataset from keyword=value pairs, without Dataset.__setattr__'s per-call lookups."""
    out: dict[BaseTag, DataElement | RawDataElement] = {}
    for keyword, value in elements.items():
        entry = _TAGS.get(keyword)
        if entry is None:
            tag = tag_for_keyword(keyword)
            assert tag is not None, keyword
            entry = _TAGS[keyword] = (BaseTag(tag), dictionary_VR(tag))
        tag, vr = entry
        if vr == "SQ":
            value = DicomSequence(value)
        out[tag] = DataElement(tag, vr, value)
    return Dataset(out)


def _ref_item(ds: Dataset) -> Dataset:
    return _dataset(ReferencedSOPClassUID=ds.SOPClassUID, ReferencedSOPInstanceUID=ds.SOPInstanceUID)


def _check_geometry(datasets: Sequence[Dataset], masks: ResultMasks) -> list[list[float]]:
    z, rows, cols = masks.original_shape
    if len(datasets) != z:
        raise ValueError(f"argument 'masks' covers {z} slices, the source series has {len(datasets)}")
    positions = []
    for i, ds in enumerate(datasets):
        if int(ds.get("Rows", 0)) != rows or int(ds.get("Columns", 0)) != cols:
            raise ValueError(f"argument 'source_datasets'[{i}] is not {rows}x{cols} like the masks")
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "FrameOfReferenceUID"):
            if keyword not in ds:
                raise ValueError(f"argument 'source_datasets'[{i}] lacks {keyword}")
        positions.append([float(v) for v in ds.ImagePositionPatient])
    return positions


def build_segmentation(
    source_datasets: Sequence[Dataset],
    result: ScoreResult,
    masks: ResultMasks,
    result_version: int,
    *,
    created_at: dt.datetime | None = None,
    series_number: int | None = None,
    compression: str = "deflate",
) -> Dataset:
    """Build the DICOM SEG of a scored result.

    Args:
        source_datasets: the scored series' instances (headers suffice), in the order of
            ``result.source_sop_instance_uids``.
        result: a ``scored`` result.
        masks: the masks it was measured on (same slices, same image size).
        result_version: 1, 2, ...
        created_at: as for the SC and SR builders (pass the result's timestamp).
        series_number: default ``9200 + result_version``.
        compression: ``deflate`` (default) or ``none`` (:data:`SEG_COMPRESSIONS`).

    Raises:
        TypeError/ValueError naming the bad argument (e.g. a result that is not
        scored, masks of another shape, a source without geometry).
    """
    datasets = base.validate_inputs(source_datasets, result, result_version)
    series_number = _check_seg_arguments(result, masks, result_version, series_number, compression)
    positions = _check_geometry(datasets, masks)
    numbers = segment_numbers(masks)
    if not numbers:
        raise ValueError("argument 'masks' is empty: no lung voxel to segment")
    when = base.resolve_created_at(created_at, datasets)
    source_series = str(datasets[0].SeriesInstanceUID)

    frames = {key: _frames(masks, key) for key in numbers}
    seg = _template(datasets, result, masks, result_version, series_number, numbers, frames, when)

    # Deterministic dimension organization UID (highdicom draws a random one).
    dim_uid = output_uid(source_series, result_version, "seg-dimension")
    for item in seg.DimensionOrganizationSequence:
        item.DimensionOrganizationUID = dim_uid
    for item in seg.DimensionIndexSequence:
        item.DimensionOrganizationUID = dim_uid

    _set_frames(seg, datasets, masks, numbers, frames, _position_index(datasets, positions, frames))
    seg.SegmentsOverlap = "YES"

    seg.SourceImageSequence = [_ref_item(ds) for ds in datasets]
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = source_series
    series_ref.ReferencedInstanceSequence = DicomSequence([_ref_item(ds) for ds in datasets])
    seg.ReferencedSeriesSequence = [series_ref]
    seg.ImageType = ["DERIVED", "PRIMARY"]
    if any(str(ds.get("LossyImageCompression", "")) == "01" for ds in datasets):
        seg.LossyImageCompression = "01"
    base.freeze_times(seg, when)
    seg.file_meta.TransferSyntaxUID = SEG_COMPRESSIONS[compression]
    return seg


def _check_seg_arguments(result: ScoreResult, masks: ResultMasks, result_version: int, series_number: int | None,
                         compression: str) -> int:
    """What build_segmentation checks beyond base.validate_inputs; the series number to use."""
    if result.status != "scored":
        raise ValueError(f"argument 'result' is {result.status}: only a scored result has a segmentation")
    if not isinstance(masks, ResultMasks):
        raise TypeError(f"argument 'masks' must be a ResultMasks, got {type(masks).__name__}")
    if compression not in SEG_COMPRESSIONS:
        raise ValueError(f"argument 'compression' must be one of {', '.join(SEG_COMPRESSIONS)}, got {compression!r}")
    if series_number is None:
        series_number = SEG_SERIES_NUMBER_BASE + result_version
    if isinstance(series_number, bool) or not isinstance(series_number, int) or not 0 < series_number < 2**31:
        raise ValueError(f"argument 'series_number' must be an int 1..2147483647, got {series_number!r}")
    return series_number


def _segment_descriptions(result: ScoreResult, numbers: dict[str, int]) -> list[hd.seg.SegmentDescription]:
    algorithm = hd.AlgorithmIdentificationSequence(
        name=base.plain_text(result.model)[:64],
        version=base.plain_text(result.model_version)[:64] or "unknown",
        family=codes.cid7162.ArtificialIntelligence,
        source="ct-triage",
    )
    descriptions = []
    for key, number in numbers.items():
        spec = SPECS[key]
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=spec.label,
            segmented_property_category=spec.category,
            segmented_property_type=spec.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[spec.region] if spec.region is not None else None,
        ))
    return descriptions


def _template(datasets: list[Dataset], result: ScoreResult, masks: ResultMasks, result_version: int,
              series_number: int, numbers: dict[str, int], frames: dict[str, list[int]],
              when: dt.datetime) -> hd.seg.Segmentation:
    """The SEG without its frames: highdicom validates the module set once, on a one-slice,
    one-pixel array."""
    source_series = str(datasets[0].SeriesInstanceUID)
    _, rows, cols = masks.original_shape
    descriptions = _segment_descriptions(result, numbers)
    first_key = next(iter(numbers))
    k0 = frames[first_key][0]
    template_pixels = np.zeros((1, rows, cols, len(numbers)), dtype=np.uint8)
    template_pixels[0, 0, 0, 0] = 1
    return hd.seg.Segmentation(
        source_images=[datasets[k0]],
        pixel_array=template_pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=output_uid(source_series, result_version, "seg-series"),
        series_number=series_number,
        sop_instance_uid=output_uid(source_series, result_version, "seg-instance", 0),
        instance_number=1,
        manufacturer=base.MANUFACTURER,
        manufacturer_model_name=base.plain_text(result.model)[:64],
        software_versions=f"ct-triage {__version__}"[:64],
        device_serial_number="0",
        content_description=base.plain_text(
            f"Lungs and COVID-19 lesions by {result.model} {result.model_version}; NOT FOR DIAGNOSTIC USE")[:64],
        content_label="CTTRIAGE",
        series_description=base.series_description("segmentation", result_version),
        content_creator_name=None,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=False,
        contributing_equipment=[base.contributing_equipment(
            result, when, f"Lung and lesion segmentation by {result.model} {result.model_version}")],
    )


def _position_index(datasets: list[Dataset], positions: list[list[float]],
                    frames: dict[str, list[int]]) -> dict[int, int]:
    """Position index: rank along the slice normal among the positions that have frames."""
    iop = [float(v) for v in datasets[0].ImageOrientationPatient]
    normal = np.cross(iop[:3], iop[3:])
    used = sorted({k for ks in frames.values() for k in ks}, key=lambda k: float(np.dot(normal, positions[k])))
    return {k: i + 1 for i, k in enumerate(used)}


def _set_frames(seg: hd.seg.Segmentation, datasets: list[Dataset], masks: ResultMasks, numbers: dict[str, int],
                frames: dict[str, list[int]], position_index: dict[int, int]) -> None:
    """Replace the template's one frame by every segment's frames: per-frame functional
    groups, NumberOfFrames and the bit-packed Pixel Data."""
    template_item = seg.PerFrameFunctionalGroupsSequence[0]
    derivation_code = template_item.DerivationImageSequence[0].DerivationCodeSequence
    purpose = template_item.DerivationImageSequence[0].SourceImageSequence[0].PurposeOfReferenceCodeSequence
    _, rows, cols = masks.original_shape

    # Per-frame functional groups, built element by element (Dataset.__setattr__'s
    # keyword lookups dominate otherwise); the code sequences are shared, not copied.
    per_frame = []
    packed = []
    for key, number in numbers.items():
        for k in sorted(frames[key], key=lambda k: position_index[k]):
            source = datasets[k]
            ref = _dataset(ReferencedSOPClassUID=source.SOPClassUID, ReferencedSOPInstanceUID=source.SOPInstanceUID,
                           PurposeOfReferenceCodeSequence=purpose, SpatialLocationsPreserved="YES")
            derivation = _dataset(DerivationCodeSequence=derivation_code, SourceImageSequence=[ref])
            per_frame.append(_dataset(
                DerivationImageSequence=[derivation],
                FrameContentSequence=[_dataset(DimensionIndexValues=[number, position_index[k]])],
                PlanePositionSequence=[_dataset(ImagePositionPatient=source.ImagePositionPatient)],
                SegmentIdentificationSequence=[_dataset(ReferencedSegmentNumber=number)],
            ))
            # BINARY frames are bit-packed without padding between frames (PS3.5 8.1.1);
            # rows x cols is a multiple of 8 here, so frame-by-frame packing is the same.
            packed.append(np.packbits(_original_segment(masks, key, k), bitorder="little").tobytes())
    seg.PerFrameFunctionalGroupsSequence = per_frame  # pydicom makes a list a Sequence
    seg.NumberOfFrames = len(per_frame)
    pixel_data = b"".join(packed)
    if (rows * cols) % 8:
        bits = np.concatenate([_original_segment(masks, key, k).ravel() for key in numbers
                               for k in sorted(frames[key], key=lambda k: position_index[k])])
        pixel_data = np.packbits(bits, bitorder="little").tobytes()
    if len(pixel_data) % 2:
        pixel_data += b"\x00"
    seg[0x7FE00010] = DataElement(0x7FE00010, "OB", pixel_data)


__all__ = ["build_segmentation", "segment_numbers", "SEG_COMPRESSIONS", "SPECS"]
