"""Enhanced (multi-frame) MR objects load as the same series as their single-frame twin.

One random sagittal volume is written as single-frame MR files (kneebatch's writer) and as
one multi-frame object by writers independent of kneebatch: highdicom's Legacy Converted
Enhanced MR (frames in order and shuffled) and an Enhanced MR Image built from plain
pydicom functional groups (shuffled frames, a rescale intercept per frame). Every one must
give the same voxels, exactly, and the same grid. Objects holding several stacks (echoes,
orientations) are split into one series per stack, never mixed.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from kneebatch.geometry import Grid
from kneebatch.ingest import dicom, enhanced
from kneebatch.synth.dicom_writer import SeriesInfo, write_series

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
LEGACY_CONVERTED_MR = "1.2.840.10008.5.1.4.1.1.4.4"
SHAPE = (12, 40, 48)
SPACING = (3.0, 0.5, 0.4)  # dz, dy (row spacing), dx (column spacing)
ORIGIN = (10.0, -20.0, 30.0)
TR, TE = 500.0, 15.0

have_pydicom_data = importlib.util.find_spec("data_store") is not None  # pydicom-data: emri_small.dcm


def _rotation(deg_z: float, deg_x: float) -> np.ndarray:
    a, b = np.radians(deg_z), np.radians(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _sagittal_grid(shape=SHAPE) -> Grid:
    """Rows along (0,1,0), columns down (0,0,-1), both turned 12° about z and 7° about x: the
    slice normal (row x column, which kneebatch stacks along) stays within 30° of left-right."""
    r = _rotation(12, 7)
    row_dir, col_dir = r @ [0.0, 1.0, 0.0], r @ [0.0, 0.0, -1.0]
    normal = np.cross(row_dir, col_dir)
    return Grid.from_parts(shape, SPACING, ORIGIN, np.column_stack([normal, col_dir, row_dir]))


def _axial_grid(shape) -> Grid:
    return Grid.from_parts(shape, (4.0, 0.5, 0.4), (-10.0, -12.0, 80.0),
                           np.column_stack([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))


def _volume(seed=0, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).integers(200, 4096, shape, dtype=np.uint16)


PATIENT = {"PatientID": "ENH-1", "PatientName": "Enhanced^Test"}


def _study() -> dict:
    return {"StudyInstanceUID": generate_uid(), "FrameOfReferenceUID": generate_uid(),
            "StudyDate": "20240101", "StudyTime": "120000", "StudyID": "1", "AccessionNumber": "A1",
            "ReferringPhysicianName": "", "PatientBirthDate": "19700101", "PatientSex": "F"}


def _single_frame(folder: Path, volume, grid, study, series_uid=None, slice_order=None) -> list[Path]:
    info = SeriesInfo("SAG T1", 3, TR, TE, "2D", SPACING[0], uid=series_uid or generate_uid())
    return write_series(folder, volume, grid, info, PATIENT, study, slice_order=slice_order)


def _series(paths) -> dicom.Series:
    headers = []
    for p in paths:
        h = dicom.read_header(str(p))
        assert not isinstance(h, dicom.FileProblem), h
        headers.extend(h if isinstance(h, list) else [h])
    assert len({h.series_uid for h in headers}) == 1
    return dicom.Series(headers[0].series_uid, headers)


def _assert_same(a: tuple, b: tuple):
    (va, ga), (vb, gb) = a, b
    assert va.dtype == vb.dtype == np.uint16
    assert ga.shape == gb.shape
    assert np.array_equal(va, vb)
    assert np.max(np.abs(ga.affine - gb.affine)) < 1e-4


def _fg_item(**sequences) -> Dataset:
    """A functional-group item: keyword -> dict of the attributes of its one sequence item."""
    item = Dataset()
    for seq_kw, attrs in sequences.items():
        inner = Dataset()
        for k, v in attrs.items():
            setattr(inner, k, v)
        setattr(item, seq_kw, Sequence([inner]))
    return item


def _ds(v: float) -> str:
    return f"{v:.10g}"


def _plain_enhanced(path: Path, frames: list[dict], study: dict, series_uid: str, shared: dict | None = None,
                    rows=SHAPE[1], columns=SHAPE[2]) -> Dataset:
    """An Enhanced MR Image written with plain pydicom. ``frames``: per frame, ``pixels`` and the
    per-frame functional groups (keyword -> attributes); ``shared``: the shared ones."""
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENHANCED_MR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.SOPClassUID = ENHANCED_MR
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    for k, v in {**PATIENT, **study}.items():
        setattr(ds, k, v)
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 7
    ds.SeriesDescription = "SAG T1 enhanced"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.MRAcquisitionType = "2D"
    ds.PulseSequenceName = "TSE"
    ds.EchoPulseSequence = "SPIN"
    ds.SpectrallySelectedSuppression = "FAT"
    ds.SegmentedKSpaceTraversal = "PARTIAL"
    ds.BodyPartExamined = "KNEE"
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SharedFunctionalGroupsSequence = Sequence([_fg_item(**(shared or {}))])
    ds.PerFrameFunctionalGroupsSequence = Sequence([_fg_item(**f["groups"]) for f in frames])
    ds.PixelData = np.stack([f["pixels"] for f in frames]).astype("<u2").tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return ds


def _sagittal_shared(grid: Grid, te=TE) -> dict:
    d = grid.direction
    return {
        "PlaneOrientationSequence": {"ImageOrientationPatient": [_ds(v) for v in (*d[:, 2], *d[:, 1])]},
        "PixelMeasuresSequence": {"PixelSpacing": [_ds(SPACING[1]), _ds(SPACING[2])],
                                  "SliceThickness": _ds(SPACING[0])},
        "MRTimingAndRelatedParametersSequence": {"RepetitionTime": TR, "FlipAngle": 90.0},
        **({"MREchoSequence": {"EffectiveEchoTime": te}} if te is not None else {}),
    }


def _position(grid: Grid, z: int) -> list:
    return [_ds(v) for v in grid.index_to_world([z, 0, 0])]


# ------------------------------------------------------------------ pydicom's emri_small
@pytest.mark.skipif(not have_pydicom_data, reason="emri_small.dcm ships in pydicom-data (pip install pydicom-data)")
def test_emri_small_per_frame_headers_and_pixels(tmp_path):
    from pydicom.data import get_testdata_file

    path = get_testdata_file("emri_small.dcm")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == ENHANCED_MR and int(ds.NumberOfFrames) == 10
    # this small test object carries no functional groups at all: no frame can be placed
    assert "PerFrameFunctionalGroupsSequence" not in ds and "SharedFunctionalGroupsSequence" not in ds
    headers = dicom.read_header(path)
    assert [h.frame for h in headers] == list(range(10))
    assert {(h.position, h.orientation, h.pixel_spacing) for h in headers} == {(None, None, None)}
    assert {h.series_uid for h in headers} == {ds.SeriesInstanceUID}
    h = headers[0]
    assert (h.rows, h.columns, h.frames, h.modality) == (64, 64, 10, "MR")
    # the enhanced contrast attributes, translated (PulseSequenceName, EchoPulseSequence GRADIENT,
    # SegmentedKSpaceTraversal PARTIAL, SteadyStatePulseSequence LONGITUDINAL, Spoiling RF,
    # SpectrallySelectedExcitation WATER)
    assert h.sequence_name == "T1TFE"
    assert h.scanning_sequence == ("GR",)
    assert h.sequence_variant == ("SK", "SS", "SP")
    assert h.scan_options == ("FS",)
    assert h.acquisition_type == "3D"
    assert (h.tr, h.te, h.ti, h.flip_angle) == (None, None, None, None)
    assert dicom.classify(dicom.Series(h.series_uid, headers)) == (None, "multiframe_no_positions")

    # the same frames given geometry with plain pydicom functional groups: each frame's pixels
    # land, exactly, at the slice its position says (frame k placed at slice order[k])
    grid = _sagittal_grid((10, 64, 64))
    order = np.random.default_rng(3).permutation(10)
    ds.SharedFunctionalGroupsSequence = Sequence([_fg_item(**_sagittal_shared(grid))])
    ds.PerFrameFunctionalGroupsSequence = Sequence(
        [_fg_item(PlanePositionSequence={"ImagePositionPatient": _position(grid, int(z))}) for z in order])
    ds.save_as(tmp_path / "emri_placed.dcm")
    headers = dicom.read_header(str(tmp_path / "emri_placed.dcm"))
    for k, h in enumerate(headers):
        pos = ds.PerFrameFunctionalGroupsSequence[k].PlanePositionSequence[0].ImagePositionPatient
        iop = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
        assert h.position == tuple(float(v) for v in pos)
        assert h.orientation == tuple(float(v) for v in iop)
        assert h.pixel_spacing == (0.5, 0.4)
        assert (h.tr, h.te, h.flip_angle) == (TR, TE, 90.0)
    volume, got = dicom.read_series(dicom.Series(headers[0].series_uid, headers))
    pixels = ds.pixel_array
    assert volume.shape == (10, 64, 64)
    for k, z in enumerate(order):
        assert np.array_equal(volume[z], pixels[k])
    assert np.max(np.abs(got.affine - grid.affine)) < 1e-4


# ------------------------------------------------------------------ one volume, four writers
@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """The single-frame series and its read volume/grid, the volume and its grid as written."""
    root = tmp_path_factory.mktemp("enhanced")
    volume, grid = _volume(), _sagittal_grid()
    study = _study()
    series_uid = generate_uid()
    order = np.random.default_rng(1).permutation(SHAPE[0])
    paths = _single_frame(root / "single", volume, grid, study, series_uid, slice_order=order)
    single = dicom.read_series(_series(paths))
    return root, volume, grid, study, series_uid, paths, single


def test_single_frame_twin_is_the_volume(twins):
    _, volume, grid, _, _, _, (v, g) = twins
    assert np.array_equal(v, volume)
    assert np.max(np.abs(g.affine - grid.affine)) < 1e-4


def _highdicom(paths, out: Path, shuffle_seed: int | None) -> Dataset:
    hd = pytest.importorskip("highdicom")
    datasets = [pydicom.dcmread(p) for p in paths]
    if shuffle_seed is not None:
        datasets = [datasets[i] for i in np.random.default_rng(shuffle_seed).permutation(len(datasets))]
    enh = hd.legacy.LegacyConvertedEnhancedMRImage(
        datasets, series_instance_uid=datasets[0].SeriesInstanceUID, series_number=3,
        sop_instance_uid=generate_uid(), instance_number=1,
        # without a dimension index highdicom keeps the frames in the order given
        include_dimension_index=shuffle_seed is None)
    out.parent.mkdir(parents=True, exist_ok=True)
    enh.save_as(out)
    return enh


@pytest.mark.parametrize("shuffle_seed", [None, 5], ids=["ordered", "shuffled"])
def test_highdicom_legacy_converted_equals_single_frame(twins, shuffle_seed):
    root, volume, grid, study, series_uid, paths, single = twins
    out = root / f"highdicom-{shuffle_seed}" / "enhanced.dcm"
    enh = _highdicom(paths, out, shuffle_seed)
    assert enh.SOPClassUID == LEGACY_CONVERTED_MR and int(enh.NumberOfFrames) == SHAPE[0]
    series = _series([out])
    assert series.uid == series_uid  # one stack: the object's own series uid, as its twin's
    assert sorted(h.frame for h in series.slices) == list(range(SHAPE[0]))
    along = [np.dot(h.position, grid.direction[:, 0]) for h in sorted(series.slices, key=lambda h: h.frame)]
    monotonic = np.all(np.diff(along) > 0) or np.all(np.diff(along) < 0)
    assert monotonic == (shuffle_seed is None)  # highdicom's dimension index sorts the frames; shuffled: not
    # per-frame positions as highdicom wrote them; TR/TE from its unassigned converted attributes
    for h in series.slices:
        pos = enh.PerFrameFunctionalGroupsSequence[h.frame].PlanePositionSequence[0].ImagePositionPatient
        assert h.position == tuple(float(v) for v in pos)
    singles = {Path(h.path).name: h for h in _series(paths).slices}
    twin = singles["001"]
    h = series.first
    assert (h.tr, h.te, h.orientation, h.pixel_spacing, h.scanning_sequence, h.sequence_variant) == \
        (twin.tr, twin.te, twin.orientation, twin.pixel_spacing, ("SE",), ("SK",))
    assert (h.acquisition_type, h.body_part) == ("2D", "KNEE")
    assert dicom.classify(series) == dicom.classify(_series(paths))
    _assert_same(dicom.read_series(series), single)


def _plain_twin(path: Path, volume, grid, study, series_uid, seed=7) -> np.ndarray:
    """The volume as one Enhanced MR Image from plain pydicom: frames shuffled, a position and a
    rescale intercept per frame, the rest shared. Returns the slice of each frame."""
    order = np.random.default_rng(seed).permutation(SHAPE[0])
    frames = []
    for k, z in enumerate(order):
        intercept = 10 * k + 1  # stored = value - intercept: exact in float64
        frames.append({"pixels": volume[z].astype(np.int64) - intercept, "groups": {
            "PlanePositionSequence": {"ImagePositionPatient": _position(grid, int(z))},
            "FrameContentSequence": {"StackID": "1", "InStackPositionNumber": int(z) + 1},
            "PixelValueTransformationSequence": {"RescaleIntercept": str(intercept), "RescaleSlope": "1",
                                                 "RescaleType": "US"},
        }})
    path.parent.mkdir(parents=True, exist_ok=True)
    _plain_enhanced(path, frames, study, series_uid, _sagittal_shared(grid))
    return order


def test_plain_pydicom_functional_groups_equal_single_frame(twins, monkeypatch):
    root, volume, grid, study, series_uid, _, single = twins
    path = root / "plain" / "enhanced"
    order = _plain_twin(path, volume, grid, study, series_uid)
    series = _series([path])
    assert series.uid == series_uid
    h = series.first
    assert (h.frame, h.frames, h.tr, h.te, h.flip_angle) == (0, SHAPE[0], TR, TE, 90.0)
    assert (h.sequence_name, h.scanning_sequence, h.sequence_variant, h.scan_options) == \
        ("TSE", ("SE",), ("SK",), ("FS",))
    assert [h.position for h in series.slices] == [tuple(float(v) for v in _position(grid, int(z))) for z in order]
    # the file is read and decoded once, and hashed once
    reads = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: reads.append(1) or real(*a, **k))
    hasher = hashlib.sha256()
    got = dicom.read_series(series, hasher)
    assert len(reads) == 1
    assert hasher.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
    _assert_same(got, single)


def test_discover_makes_one_series_of_the_multiframe_file(twins):
    from kneebatch.jobs.convert import discover

    root, volume, grid, study, series_uid, _, single = twins
    out = root / "discover" / "enhanced.dcm"
    _plain_twin(out, volume, grid, study, series_uid, seed=11)
    studies, n_files, problems = discover(out.parent, show_progress=False)
    assert (n_files, problems) == (1, [])
    assert list(studies) == [study["StudyInstanceUID"]]
    (series,) = studies[study["StudyInstanceUID"]].series.values()
    assert series.uid == series_uid
    assert len(series.slices) == SHAPE[0]
    assert sorted(h.frame for h in series.slices) == list(range(SHAPE[0]))
    assert {h.path for h in series.slices} == {str(out)}
    _assert_same(dicom.read_series(series), single)


# ------------------------------------------------------------------ several stacks in one object
def test_two_echoes_become_two_series(tmp_path):
    """A dual-echo object (the echoes' frames interleaved, same positions): one series per echo,
    ``<uid>#te=15`` and ``<uid>#te=80``, each exactly its echo's volume."""
    grid = _sagittal_grid()
    echoes = {15.0: _volume(1), 80.0: _volume(2)}
    study, uid = _study(), generate_uid()
    frames = []
    for z in range(SHAPE[0]):
        for te, vol in echoes.items():
            frames.append({"pixels": vol[z], "groups": {
                "PlanePositionSequence": {"ImagePositionPatient": _position(grid, z)},
                "MREchoSequence": {"EffectiveEchoTime": te},
                "MRTimingAndRelatedParametersSequence": {"RepetitionTime": 2500.0, "FlipAngle": 90.0},
            }})
    shared = _sagittal_shared(grid, te=None)
    del shared["MRTimingAndRelatedParametersSequence"]
    _plain_enhanced(tmp_path / "dual", frames, study, uid, shared)
    headers = dicom.read_header(str(tmp_path / "dual"))
    assert len(headers) == 2 * SHAPE[0]
    assert [h.series_uid for h in headers[:2]] == [uid + "#te=15", uid + "#te=80"]
    studies = dicom.group_studies(headers)
    series = studies[study["StudyInstanceUID"]].series
    assert sorted(series) == [uid + "#te=15", uid + "#te=80"]
    for te, vol in echoes.items():
        s = series[f"{uid}#te={te:g}"]
        assert len(s.slices) == SHAPE[0] and {h.te for h in s.slices} == {te}
        assert [h.frame for h in s.slices] == list(range(0 if te == 15 else 1, 2 * SHAPE[0], 2))
        v, g = dicom.read_series(s)
        assert np.array_equal(v, vol)
        assert np.max(np.abs(g.affine - grid.affine)) < 1e-4


def test_two_orientations_become_two_series(tmp_path):
    """Stack 1 sagittal (12 frames), stack 2 axial (9 frames), in one object: split by stack and
    orientation; the sagittal one is a usable series, the axial one is refused as not sagittal."""
    sag, ax = _sagittal_grid(), _axial_grid((9, SHAPE[1], SHAPE[2]))
    vol_sag, vol_ax = _volume(4), _volume(5, (9, SHAPE[1], SHAPE[2]))
    study, uid = _study(), generate_uid()

    def frame(g, vol, z, stack):
        d = g.direction
        return {"pixels": vol[z], "groups": {
            "PlanePositionSequence": {"ImagePositionPatient": _position(g, z)},
            "PlaneOrientationSequence": {"ImageOrientationPatient": [_ds(v) for v in (*d[:, 2], *d[:, 1])]},
            "FrameContentSequence": {"StackID": stack, "InStackPositionNumber": z + 1},
        }}

    frames = [frame(ax, vol_ax, z, "2") for z in range(9)] + [frame(sag, vol_sag, z, "1") for z in range(SHAPE[0])]
    shared = _sagittal_shared(sag)
    del shared["PlaneOrientationSequence"]
    _plain_enhanced(tmp_path / "two", frames, study, uid, shared)
    headers = dicom.read_header(str(tmp_path / "two"))
    series = dicom.group_studies(headers)[study["StudyInstanceUID"]].series
    # orientations are numbered in the order they first appear in the object
    sag_uid, ax_uid = uid + "#stack=1,orientation=2", uid + "#stack=2,orientation=1"
    assert sorted(series) == sorted([sag_uid, ax_uid])
    assert [len(series[sag_uid].slices), len(series[ax_uid].slices)] == [SHAPE[0], 9]
    assert dicom.classify(series[ax_uid]) == (None, "not_sagittal")
    assert dicom.classify(series[sag_uid])[1] == ""
    v, g = dicom.read_series(series[sag_uid])
    assert np.array_equal(v, vol_sag)
    assert np.max(np.abs(g.affine - sag.affine)) < 1e-4
    v, g = dicom.read_series(series[ax_uid])
    assert np.array_equal(v, vol_ax)
    assert np.max(np.abs(g.affine - ax.affine)) < 1e-4


def test_frames_without_positions_are_refused(tmp_path):
    """A multi-frame object whose frames carry no PlanePositionSequence (only a top-level
    ImagePositionPatient, which can describe one frame): its series is refused, not stacked."""
    grid = _sagittal_grid()
    vol = _volume(6)
    study, uid = _study(), generate_uid()
    frames = [{"pixels": vol[z], "groups": {}} for z in range(SHAPE[0])]
    ds = _plain_enhanced(tmp_path / "noplace", frames, study, uid, _sagittal_shared(grid))
    ds.ImagePositionPatient = _position(grid, 0)
    ds.save_as(tmp_path / "noplace")
    headers = dicom.read_header(str(tmp_path / "noplace"))
    assert len(headers) == SHAPE[0] and {h.position for h in headers} == {None}
    assert headers[0].orientation is not None  # from the shared functional groups
    assert dicom.classify(dicom.Series(uid, headers)) == (None, "multiframe_no_positions")


def test_absurd_frame_count_is_refused_from_the_header(tmp_path):
    grid = _sagittal_grid()
    study, uid = _study(), generate_uid()
    ds = _plain_enhanced(tmp_path / "huge", [{"pixels": _volume(7)[0], "groups": {}}], study, uid,
                         _sagittal_shared(grid))
    ds.NumberOfFrames = enhanced.MAX_FRAMES + 1
    ds.save_as(tmp_path / "huge")
    p = dicom.read_header(str(tmp_path / "huge"))
    assert isinstance(p, dicom.FileProblem) and (p.reason, p.detail) == ("too_large", f"{enhanced.MAX_FRAMES + 1} frames")
