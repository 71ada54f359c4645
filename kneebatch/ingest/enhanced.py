"""Enhanced (multi-frame) MR objects: one header per frame, from the functional groups.

An Enhanced MR Image (1.2.840.10008.5.1.4.1.1.4.1), a Legacy Converted Enhanced MR Image
(1.2.840.10008.5.1.4.1.1.4.4) or any other multi-frame MR object with functional groups
holds a whole stack in one file. :func:`frame_fields` gives, for each frame, what a
single-frame file's header would say, so that the rest of ingest (grouping, roles,
stacking) sees N slices exactly as if the stack had been written one file per slice.

Where each value is looked for, first found wins (DICOM PS3.3 C.7.6.16, C.8.13):

* per-frame item of PerFrameFunctionalGroupsSequence, then SharedFunctionalGroupsSequence:
  PlanePositionSequence > ImagePositionPatient, PlaneOrientationSequence >
  ImageOrientationPatient, PixelMeasuresSequence > PixelSpacing,
  MRTimingAndRelatedParametersSequence > RepetitionTime / FlipAngle,
  MREchoSequence > EffectiveEchoTime, MRModifierSequence > InversionTimes (and the
  modifiers below), PixelValueTransformationSequence > RescaleSlope / RescaleIntercept,
  FrameContentSequence > StackID / TemporalPositionIndex,
  MRImageFrameTypeSequence > ComplexImageComponent, FrameAnatomySequence > FrameLaterality
  (and AnatomicRegionSequence, for BodyPartExamined when the top level has none);
* the classic attribute (RepetitionTime, EchoTime, ScanningSequence, ...) in the frame's
  UnassignedPerFrameConvertedAttributesSequence, the shared
  UnassignedSharedConvertedAttributesSequence (where legacy conversion leaves them), then
  the top level;
* orientation and pixel spacing also from the top level (legacy multi-frame MR). A frame
  position is never taken from the top level: ImagePositionPatient there can describe one
  frame only. A frame without a position keeps ``position=None``; the series is then
  refused (``classify``: ``multiframe_no_positions``), since its frames cannot be placed.

Enhanced MR has no ScanningSequence / SequenceVariant / ScanOptions; when the classic
attributes are absent they are derived from the MR Pulse Sequence module and the MR
Modifier / MR Imaging Modifier macros: EchoPulseSequence SPIN/GRADIENT/BOTH -> SE/GR,
InversionRecovery YES -> IR, EchoPlanarPulseSequence YES -> EP; SegmentedKSpaceTraversal
PARTIAL/FULL -> SK, SteadyStatePulseSequence -> SS (TIME_REVERSED -> TRSS), Spoiling ->
SP, MagnetizationTransfer -> MTC, OversamplingPhase -> OSP; SpectrallySelectedSuppression
FAT/FAT_AND_WATER or SpectrallySelectedExcitation WATER (water excitation) -> FS,
FlowCompensation -> FC, SpatialPresaturation SLAB -> SP, PartialFourier with
PartialFourierDirection PHASE/FREQUENCY -> PFP/PFF. PulseSequenceName fills SequenceName.

Several stacks in one object (echoes, orientations, StackIDs, temporal positions,
magnitude/phase) are **split into separate series**, never mixed: when the frames of one
file differ in any of these, each frame's series uid gets a suffix naming the values that
differ, e.g. ``<SeriesInstanceUID>#te=12`` and ``<SeriesInstanceUID>#te=80`` for a
dual-echo object. An object holding a single stack keeps its SeriesInstanceUID, so it
groups exactly like the same volume written as single-frame files.
"""

from __future__ import annotations

import numpy as np

from kneebatch.ingest.values import first_float, floats, present, rescale_value, words

# the top-level attributes the header scan needs for multi-frame objects (added to
# kneebatch.ingest.dicom.HEADER_TAGS)
HEADER_TAGS = [
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
    # MR Pulse Sequence module (top level in Enhanced MR)
    "PulseSequenceName", "EchoPulseSequence", "EchoPlanarPulseSequence", "SteadyStatePulseSequence",
    "SegmentedKSpaceTraversal", "SpectrallySelectedSuppression", "OversamplingPhase",
    # in emri-style objects some modifiers also stand at the top level
    "SpectrallySelectedExcitation", "Spoiling", "MagnetizationTransfer", "InversionRecovery",
]
MAX_FRAMES = 65536  # frames in one object; more is refused from the header (too_large)
ORIENTATION_TOL = 1e-3  # frames whose ImageOrientationPatient differ by more belong to different stacks

_ECHO_PULSE = {"SPIN": ("SE",), "GRADIENT": ("GR",), "BOTH": ("SE", "GR")}
_NO = ("", "NO", "NONE")


def n_frames(ds) -> int:
    try:
        return max(int(float(ds.get("NumberOfFrames") or 1)), 1)
    except (TypeError, ValueError):
        return 1


def _item(seq, i: int = 0):
    try:
        return seq[i] if seq is not None and len(seq) > i else None
    except TypeError:
        return None


def _fg(items, seq_kw: str, kw: str):
    """``kw`` inside the first item of ``seq_kw`` of the first functional-group item that has it."""
    for group in items:
        if group is None:
            continue
        inner = _item(group.get(seq_kw))
        if inner is not None:
            v = inner.get(kw)
            if present(v):
                return v
    return None


def _classic(items, ds, kw: str):
    """A classic (single-frame) attribute: unassigned converted attributes of the frame, the
    shared ones, then the top level."""
    frame_item, shared_item = items
    for group, seq_kw in ((frame_item, "UnassignedPerFrameConvertedAttributesSequence"),
                          (shared_item, "UnassignedSharedConvertedAttributesSequence")):
        inner = _item(group.get(seq_kw)) if group is not None else None
        if inner is not None:
            v = inner.get(kw)
            if present(v):
                return v
    v = ds.get(kw)
    return v if present(v) else None


def _cs(v) -> str:
    return str(v).strip().upper() if present(v) else ""


def _modifier(items, ds, seq_kw: str, kw: str) -> str:
    v = _fg(items, seq_kw, kw)
    return _cs(v if v is not None else ds.get(kw))


def _contrast(items, ds) -> dict:
    """ScanningSequence / SequenceVariant / ScanOptions / SequenceName: the classic attributes
    where present, else derived from the enhanced ones."""
    out = {}
    scanning = words(_classic(items, ds, "ScanningSequence"))
    if not scanning:
        flags = list(_ECHO_PULSE.get(_cs(ds.get("EchoPulseSequence")), ()))
        if _modifier(items, ds, "MRModifierSequence", "InversionRecovery") == "YES":
            flags.append("IR")
        if _cs(ds.get("EchoPlanarPulseSequence")) == "YES":
            flags.append("EP")
        scanning = tuple(flags)
    out["scanning_sequence"] = scanning

    variant = words(_classic(items, ds, "SequenceVariant"))
    if not variant:
        flags = []
        if _cs(ds.get("SegmentedKSpaceTraversal")) in ("PARTIAL", "FULL"):
            flags.append("SK")
        if _modifier(items, ds, "MRImagingModifierSequence", "MagnetizationTransfer") not in _NO:
            flags.append("MTC")
        steady = _cs(ds.get("SteadyStatePulseSequence"))
        if steady == "TIME_REVERSED":
            flags.append("TRSS")
        elif steady not in _NO:
            flags.append("SS")
        if _modifier(items, ds, "MRModifierSequence", "Spoiling") not in _NO:
            flags.append("SP")
        if _cs(ds.get("OversamplingPhase")) not in _NO:
            flags.append("OSP")
        variant = tuple(flags)
    out["sequence_variant"] = variant

    options = words(_classic(items, ds, "ScanOptions"))
    if not options:
        flags = []
        suppression = _cs(ds.get("SpectrallySelectedSuppression"))
        excitation = _modifier(items, ds, "MRModifierSequence", "SpectrallySelectedExcitation")
        if suppression in ("FAT", "FAT_AND_WATER") or excitation == "WATER":
            flags.append("FS")
        if _modifier(items, ds, "MRModifierSequence", "FlowCompensation") not in _NO:
            flags.append("FC")
        if _modifier(items, ds, "MRModifierSequence", "SpatialPresaturation") == "SLAB":
            flags.append("SP")
        if _modifier(items, ds, "MRModifierSequence", "PartialFourier") == "YES":
            direction = _modifier(items, ds, "MRModifierSequence", "PartialFourierDirection")
            flags += {"PHASE": ["PFP"], "FREQUENCY": ["PFF"]}.get(direction, [])
        options = tuple(flags)
    out["scan_options"] = options

    name = _classic(items, ds, "SequenceName")
    if name is None:
        name = ds.get("PulseSequenceName")
    out["sequence_name"] = str(name or "")
    return out


def _frame(ds, items, i: int) -> dict:
    pos = _fg(items, "PlanePositionSequence", "ImagePositionPatient")
    iop = _fg(items, "PlaneOrientationSequence", "ImageOrientationPatient")
    if iop is None:
        iop = _classic(items, ds, "ImageOrientationPatient")
    spacing = _fg(items, "PixelMeasuresSequence", "PixelSpacing")
    if spacing is None:
        spacing = _classic(items, ds, "PixelSpacing")
    tr = _fg(items, "MRTimingAndRelatedParametersSequence", "RepetitionTime")
    te = _fg(items, "MREchoSequence", "EffectiveEchoTime")
    flip = _fg(items, "MRTimingAndRelatedParametersSequence", "FlipAngle")
    ti = _fg(items, "MRModifierSequence", "InversionTimes")
    acq = _classic(items, ds, "MRAcquisitionType")
    side = _cs(ds.get("Laterality") or ds.get("ImageLaterality"))
    if side[:1] not in ("L", "R"):
        side = _cs(_fg(items, "FrameAnatomySequence", "FrameLaterality"))
    body_part = _cs(ds.get("BodyPartExamined"))
    if not body_part:  # enhanced objects may code it only: FrameAnatomySequence > AnatomicRegionSequence
        region = _item(_fg(items, "FrameAnatomySequence", "AnatomicRegionSequence"))
        body_part = _cs(region.get("CodeMeaning")) if region is not None else ""
    fields = {
        "frame": i,
        "position": floats(pos, 3) if pos is not None else None,
        "orientation": floats(iop, 6) if iop is not None else None,
        "pixel_spacing": floats(spacing, 2) if spacing is not None else None,
        "tr": first_float(tr if tr is not None else _classic(items, ds, "RepetitionTime")),
        "te": first_float(te if te is not None else _classic(items, ds, "EchoTime")),
        "flip_angle": first_float(flip if flip is not None else _classic(items, ds, "FlipAngle")),
        "ti": first_float(ti if ti is not None else _classic(items, ds, "InversionTime")),
        "acquisition_type": _cs(acq),
        "laterality": side[:1] if side[:1] in ("L", "R") else "",
        "body_part": body_part,
        **_contrast(items, ds),
    }
    # what tells one stack of the object from another (see split_stacks)
    fields["_stack"] = {
        "stack": _cs(_fg(items, "FrameContentSequence", "StackID")) or None,
        "t": _fg(items, "FrameContentSequence", "TemporalPositionIndex"),
        "te": None if fields["te"] is None else round(fields["te"], 3),
        "ti": None if fields["ti"] is None else round(fields["ti"], 3),
        "component": _cs(_fg(items, "MRImageFrameTypeSequence", "ComplexImageComponent")) or None,
        "orientation": fields["orientation"],
    }
    return fields


def _orientation_labels(orientations) -> list:
    """Cluster index (1, 2, ... by first appearance) of each orientation; None stays None."""
    reps: list[np.ndarray] = []
    labels = []
    for o in orientations:
        if o is None:
            labels.append(None)
            continue
        v = np.asarray(o)
        for k, r in enumerate(reps):
            if np.max(np.abs(v - r)) <= ORIENTATION_TOL:
                labels.append(k + 1)
                break
        else:
            reps.append(v)
            labels.append(len(reps))
    return labels


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def split_stacks(frames: list[dict], series_uid: str) -> None:
    """Give each frame its series uid: the object's own when all frames form one stack, else
    the uid with a suffix naming the stack (``#te=80``, ``#stack=2,orientation=1``...)."""
    keys = [dict(f.pop("_stack")) for f in frames]
    for key, label in zip(keys, _orientation_labels([k["orientation"] for k in keys])):
        key["orientation"] = label
    names = [n for n in ("stack", "t", "te", "ti", "component", "orientation")
             if len({k[n] for k in keys}) > 1]
    for f, k in zip(frames, keys):
        f["series_uid"] = series_uid + ("#" + ",".join(f"{n}={_fmt(k[n])}" for n in names) if names else "")


def frame_fields(ds, series_uid: str) -> list[dict]:
    """For each frame of a multi-frame object, the :class:`~kneebatch.ingest.dicom.SliceHeader`
    fields that differ from the object's top-level header (see the module docstring)."""
    n = n_frames(ds)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = _item(ds.get("SharedFunctionalGroupsSequence"))
    frames = [_frame(ds, (_item(per_frame, i), shared), i) for i in range(n)]
    split_stacks(frames, series_uid)
    return frames


def frame_rescale(ds, frame: int) -> tuple[float, float]:
    """(slope, intercept) of one frame: its PixelValueTransformationSequence, the shared one,
    then the top-level RescaleSlope / RescaleIntercept."""
    items = (_item(ds.get("PerFrameFunctionalGroupsSequence"), frame), _item(ds.get("SharedFunctionalGroupsSequence")))
    slope = _fg(items, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _fg(items, "PixelValueTransformationSequence", "RescaleIntercept")

    if slope is None:
        slope = ds.get("RescaleSlope")
    if intercept is None:
        intercept = ds.get("RescaleIntercept")
    return rescale_value(slope, 1.0), rescale_value(intercept, 0.0)
