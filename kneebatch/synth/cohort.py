"""The synthetic knee cohort: subjects, protocols, DICOM tree, truth and clinical table.

Deterministic per ``(seed, index)``: study *i* of a cohort is the same whatever ``n``
is and whichever process renders it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from kneebatch.geometry import Grid
from kneebatch.ingest.nifti import write_label_nifti
from kneebatch.synth import physics
from kneebatch.synth.anatomy import BODY, Anatomy
from kneebatch.synth.dicom_writer import UID_ROOT, SeriesInfo, write_series
from kneebatch.synth.render import Pose, render_image, render_labels

VISITS = ("00m", "12m", "24m", "48m")
# The clinical protocol keeps the grey-value tables of render.CONTRAST (what the shipped T1 + T2
# engines were trained on) until one-model engines trained on physics contrasts ship.
LEGACY_CLINICAL = True


@dataclass(frozen=True)
class ProtocolRanges:
    """What acquisitions look like. ``clinical`` is the realistic default."""

    inplane_mm: tuple = (0.3, 0.6)
    matrix: tuple = (256, 288, 320, 384)
    fov_mm: tuple = (110.0, 170.0)
    slice_2d_mm: tuple = (2.5, 4.0)
    slice_3d_mm: tuple = (0.7, 1.2)
    p_3d: float = 0.2
    p_gap: float = 0.5
    coverage_lr_mm: tuple = (100.0, 130.0)
    p_t2_other_grid: float = 0.3
    p_extra_series: float = 0.5
    p_shuffled_files: float = 0.5
    max_oblique_deg: float = 8.0
    # which series a study has (PROTOCOLS): "clinical" is the paper's sagittal T1 TSE + fat-suppressed
    # T2 TSE; "oai" the OAI's 3-D DESS-WE + 2-D IW-TSE-FS; "skmtea" SKM-TEA's GE qDESS; "pdfs", "t2fs",
    # "stir" one 2-D (or 3-D) series of that contrast; "mixed" draws one of MIXED per study
    protocol: str = "clinical"
    # how much knees differ (ANATOMY): "typical" draws size, cartilage, OA changes and effusion only;
    # "varied" adds what cohorts vary (flexion, varus/valgus, patella height and tilt, condyle and
    # plateau shape, fibula, meniscal extrusion and tears, Baker's cysts, body habitus, field of
    # view); "extreme" draws every subject at those ranges' ends (flexed, valgus, patella alta,
    # large effusion, KL 4)
    anatomy: str = "typical"


PRESETS = {
    "clinical": ProtocolRanges(),
    # coarse and quick: for tests and CPU training; geometry logic is the same
    "small": ProtocolRanges(inplane_mm=(0.9, 1.3), matrix=(112, 128, 144), fov_mm=(120.0, 160.0),
                            slice_2d_mm=(2.5, 4.0), slice_3d_mm=(1.5, 2.0)),
    # label volumes for training: in-plane near the fine net's 0.8 mm working grid (finer images are
    # resampled to it anyway), every slice thickness the clinical preset has, more 3-D series
    "train": ProtocolRanges(inplane_mm=(0.5, 0.85), matrix=(160, 192, 224), fov_mm=(110.0, 170.0), p_3d=0.35,
                            anatomy="varied"),
    # the OAI's sagittal knee protocol (Peterfy et al. 2008): DESS 0.7 mm slices, 0.37-0.46 mm
    # in-plane, 384 matrix; IW-TSE-FS 3 mm slices
    "oai": ProtocolRanges(inplane_mm=(0.36, 0.46), matrix=(384,), fov_mm=(138.0, 177.0), slice_2d_mm=(3.0, 3.0),
                          slice_3d_mm=(0.7, 0.7), protocol="oai"),
    # SKM-TEA's qDESS (Desai et al. 2021): 0.31 x 0.31 mm in-plane, 0.8 mm slices, 512 matrix
    "skmtea": ProtocolRanges(inplane_mm=(0.31, 0.31), matrix=(512,), fov_mm=(150.0, 170.0), slice_3d_mm=(0.8, 0.8),
                             p_3d=1.0, protocol="skmtea"),
}
ANATOMY = ("typical", "varied", "extreme")
PROTOCOLS = ("clinical", "oai", "skmtea", "pdfs", "t2fs", "stir", "mixed")
MIXED = ("clinical", "oai", "skmtea", "pdfs", "t2fs")  # what "mixed" draws from (STIR stays held out)
# the physics contrast of the single-series protocols, and its series descriptions (as scanners name them)
SINGLE_SERIES = {
    "pdfs": ("PD_TSE_FS", ("SAG PD FS", "pd_tse_fs_sag", "Sag PD FSE FS", "SAG PD SPAIR", "")),
    "t2fs": ("T2_TSE_FS", ("SAG T2 FS", "t2_tse_fs_sag", "Sag T2 FSE FS", "SAG T2 FATSAT", "")),
    "stir": ("STIR", ("SAG STIR", "t2_tirm_sag", "Sag STIR", "")),
}


def ranges_for(preset: str = "clinical", protocol: str | None = None, anatomy: str | None = None) -> ProtocolRanges:
    """A preset's acquisition ranges with ``protocol``'s series and ``anatomy``'s variation; the OAI's
    and SKM-TEA's fixed geometry replace the clinical preset's ranges (a test preset such as
    ``small`` keeps its own)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(sorted(PRESETS))}")
    if anatomy is not None and anatomy not in ANATOMY:
        raise ValueError(f"unknown anatomy range {anatomy!r}; choose from {', '.join(ANATOMY)}")
    ranges = PRESETS[preset]
    if protocol is not None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
        ranges = PRESETS[protocol] if preset == "clinical" and protocol in ("oai", "skmtea") else \
            replace(ranges, protocol=protocol)
    return replace(ranges, anatomy=anatomy) if anatomy is not None else ranges


@dataclass
class Acquisition:
    grid: Grid
    thickness_mm: float
    series: SeriesInfo
    contrast: str  # the legacy grey-value table (render.CONTRAST) when ``sequence`` is None
    sequence: physics.Sequence | None = None  # the physics contrast


@dataclass
class SubjectPlan:
    index: int
    subject_id: str
    group: str
    age: int
    sex: str
    kl_grade: int
    side: str
    anatomy: Anatomy
    pose: Pose
    study_uid: str
    study_date: date
    visit: str
    patient: dict
    study: dict
    t1: Acquisition  # the first series: the truth is drawn on its grid
    t2: Acquisition | None  # the second series (None for one-series protocols)
    extras: list = field(default_factory=list)
    shuffle_files: bool = False
    seed: tuple = ()
    protocol: str = "clinical"

    def series(self) -> list[Acquisition]:
        return [a for a in (self.t1, self.t2, *self.extras) if a is not None]


FIRST = ["James", "Mary", "Robert", "Patricia", "John", "Jennifer", "Michael", "Linda", "David", "Elizabeth",
         "Wei", "Fang", "Hiroshi", "Yuki", "Carlos", "Lucia", "Ahmed", "Fatima", "Olga", "Ivan"]
LAST = ["Smith", "Johnson", "Garcia", "Miller", "Davis", "Wang", "Li", "Zhang", "Tanaka", "Suzuki",
        "Martinez", "Lopez", "Hassan", "Ivanova", "Petrov", "Brown", "Wilson", "Moore", "Taylor", "Chen"]


def _uid(seed, index, what) -> str:
    return generate_uid(prefix=UID_ROOT, entropy_srcs=[str(seed), str(index), what])


def _in_protocol(plan: SubjectPlan) -> SubjectPlan:
    """The plan with UIDs of its own protocol: the same knee scanned in another protocol is another
    study (one store can hold both); the clinical protocol keeps the UIDs it always had."""
    if plan.protocol == "clinical":
        return plan

    def uid(old: str) -> str:
        return generate_uid(prefix=UID_ROOT, entropy_srcs=[old, plan.protocol])

    def series(acq: Acquisition | None) -> Acquisition | None:
        return None if acq is None else replace(acq, series=replace(acq.series, uid=uid(acq.series.uid)))

    study = {**plan.study, "StudyInstanceUID": uid(plan.study["StudyInstanceUID"]),
             "FrameOfReferenceUID": uid(plan.study["FrameOfReferenceUID"])}
    return replace(plan, study=study, study_uid=study["StudyInstanceUID"], t1=series(plan.t1), t2=series(plan.t2),
                   extras=[series(a) for a in plan.extras])


def _rotation(ax_deg: float, ay_deg: float, az_deg: float) -> np.ndarray:
    a, b, c = np.radians([ax_deg, ay_deg, az_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _sagittal_grid(rng, centre, ranges: ProtocolRanges, thickness, gap, matrix, inplane, oblique) -> Grid:
    """Sagittal slices: rows run anterior->posterior, columns superior->inferior (IOP 0,1,0,0,0,-1)."""
    row_dir = oblique @ np.array([0.0, 1.0, 0.0])
    col_dir = oblique @ np.array([0.0, 0.0, -1.0])
    normal = np.cross(row_dir, col_dir)
    step = thickness + gap
    coverage = rng.uniform(*ranges.coverage_lr_mm)
    nz = max(int(round(coverage / step)), 8)
    shape = (nz, matrix, matrix)
    direction = np.stack([normal, col_dir, row_dir], axis=1)
    spacing = np.array([step, inplane, inplane])
    origin = centre - direction @ ((np.asarray(shape) - 1) / 2.0 * spacing)
    return Grid.from_parts(shape, spacing, origin, direction)


def _draw_inplane(rng, ranges: ProtocolRanges):
    matrix = int(rng.choice(ranges.matrix))
    lo = max(ranges.inplane_mm[0], ranges.fov_mm[0] / matrix)
    hi = min(ranges.inplane_mm[1], ranges.fov_mm[1] / matrix)
    inplane = rng.uniform(lo, hi) if hi > lo else float(np.clip(ranges.fov_mm[0] / matrix, *ranges.inplane_mm))
    return matrix, round(float(inplane), 4)


def plan_subject(seed: int, index: int, ranges: ProtocolRanges = PRESETS["clinical"]) -> SubjectPlan:
    """One synthetic subject: who, the knee's anatomy and pose, the series acquired, the DICOM
    identity. Every part draws from ``rng`` in this order (so a seed's cohort never changes);
    the anatomy variation and the protocol have streams of their own."""
    if ranges.anatomy not in ANATOMY:
        raise ValueError(f"unknown anatomy range {ranges.anatomy!r}; choose from {', '.join(ANATOMY)}")
    rng = np.random.default_rng([seed, index])
    group, sex, age, kl = _demographics(rng, index, ranges)
    severity = max(kl - 1, 0) / 3.0  # 0 for KL 0-1, 1 for KL 4
    anatomy = _anatomy(rng, group, kl, sex, age, severity)
    # the variation's own stream: a typical cohort of a seed is the same whichever ranges exist
    variation = draw_variation(np.random.default_rng([seed, index, 6]), ranges.anatomy, group, severity)
    for name, value in variation.items():
        if hasattr(anatomy, name):
            setattr(anatomy, name, value)
    pose, joint_centre = _pose(rng, sex, variation, ranges)
    oblique, fov_centre, t1, t2, seriesno = _clinical_series(rng, seed, index, ranges, joint_centre, variation)
    # the protocol's own draws come from a stream of their own, so the clinical cohort of a seed
    # is the same whichever protocols exist
    protocol, t1, t2 = _protocol_series(np.random.default_rng([seed, index, 5]), rng, seed, index, ranges, t1, t2,
                                        fov_centre, oblique, pose.side)
    extras = _extra_series(rng, seed, index, ranges, fov_centre, oblique, seriesno) \
        if rng.random() < ranges.p_extra_series else []
    subject_id, study_date, patient, study = _identity(rng, seed, index, sex, age)
    return _in_protocol(SubjectPlan(
        index, subject_id, group, age, sex, kl, pose.side, anatomy, pose, study["StudyInstanceUID"], study_date,
        str(rng.choice(VISITS)), patient, study, t1, t2, extras,
        shuffle_files=bool(rng.random() < ranges.p_shuffled_files), seed=(seed, index), protocol=protocol))


def _demographics(rng, index: int, ranges: ProtocolRanges) -> tuple[str, str, int, int]:
    """Group (every other subject has OA), sex, age and KL grade."""
    group = "OA" if index % 2 else "normal"
    sex = str(rng.choice(["F", "M"]))
    if group == "normal":
        age = int(rng.integers(22, 62))
        kl = int(rng.choice([0, 1], p=[0.7, 0.3]))
    else:
        age = int(rng.integers(45, 82))
        kl = int(rng.choice([2, 3, 4], p=[0.45, 0.35, 0.2]))
    if ranges.anatomy == "extreme":  # advanced OA in every subject
        group, kl, age = "OA", 4, max(age, 55)
    return group, sex, age, kl


def _anatomy(rng, group: str, kl: int, sex: str, age: int, severity: float) -> Anatomy:
    """Cartilage (thinner with OA, focal defects), osteophytes from KL 2, effusion, fat and muscle."""
    cart = rng.normal(1.0, 0.07, 4)
    defects = []
    if group == "OA":
        sites = [(20, 4, 3.0), (-20, 4, 3.0), (19, 4, -1.5), (-19, 4, -1.5), (0, -31, 38)]
        for _ in range(kl - 1 + int(rng.integers(0, 2))):
            sx, sy, sz = sites[int(rng.choice(len(sites), p=[0.3, 0.15, 0.3, 0.1, 0.15]))]
            jitter = rng.uniform(-6, 6, 3) * np.array([0.7, 1.0, 0.0 if sz < 10 else 1.0])
            defects.append((sx + jitter[0], sy + jitter[1], sz + jitter[2], float(rng.uniform(2.5, 5.0))))
    osteophytes = []
    if kl >= 2:
        margins = [(37, 4, -4), (-37, 4, -4), (30, -14, -4), (-30, -14, -4), (33, 0, 14), (-33, 0, 14),
                   (30, 22, 8), (-30, 22, 8)]
        for i in rng.choice(len(margins), size=min(kl + int(rng.integers(0, 2)), len(margins)), replace=False):
            osteophytes.append((*margins[int(i)], float(rng.uniform(1.5, 3.5) * (0.6 + 0.4 * severity))))
    limb = rng.uniform(0.92, 1.12)
    return Anatomy(
        cart_femoral_mm=2.3 * cart[0] * (1 - 0.3 * severity),
        cart_medial_tibial_mm=2.0 * cart[1] * (1 - 0.45 * severity - rng.uniform(0, 0.08) * (group == "OA")),
        cart_lateral_tibial_mm=2.6 * cart[2] * (1 - 0.15 * severity),
        cart_patellar_mm=3.0 * cart[3] * (1 - 0.2 * severity),
        cart_defects=defects,
        effusion_scale=float(rng.uniform(0.5, 1.3) if group == "normal" else rng.uniform(2.5, 4.0) + 1.5 * severity),
        osteophytes=osteophytes,
        fat_mm=float(rng.uniform(5, 10) + (3 if sex == "F" else 0)),
        thigh_radii=(62.0 * limb, 56.0 * limb),
        calf_radii=(52.0 * limb, 48.0 * limb),
        muscle_scale=float(rng.uniform(0.88, 1.08) - 0.002 * max(age - 50, 0)),
        meniscus_height_mm=float(rng.uniform(5.5, 7.5) * (1 - 0.2 * severity)),
    )


def _pose(rng, sex: str, variation: dict, ranges: ProtocolRanges) -> tuple[Pose, np.ndarray]:
    """The knee's size (+-20 % in all), flexion and rotation, side and place in the scanner."""
    size = (1.04 if sex == "M" else 0.95) * rng.normal(1.0, 0.035)
    if "size" in variation:  # size +-20 % in all: the variation's draw, within those bounds
        size = float(np.clip(size * variation["size"], 0.8, 1.2)) if ranges.anatomy != "extreme" else variation["size"]
    scale = size * rng.normal(1.0, 0.015, 3)
    side = str(rng.choice(["RIGHT", "LEFT"]))
    joint_centre = np.array([rng.uniform(-80, 80), rng.uniform(-15, 15), rng.uniform(-60, 60)])
    pose = Pose(rotation=_rotation(rng.uniform(-15, 0), rng.uniform(-4, 4), rng.uniform(-8, 8)), scale=scale,
                translation=joint_centre, side=side)
    return pose, joint_centre


def _clinical_series(rng, seed: int, index: int, ranges: ProtocolRanges, joint_centre, variation: dict):
    """The clinical protocol's sagittal T1 and T2-FS (the T2 sometimes on a grid of its own), with
    the obliquity, field-of-view centre and series numbers the other protocols share."""
    oblique = _rotation(rng.uniform(-3, 3), 0.0, rng.uniform(-ranges.max_oblique_deg, ranges.max_oblique_deg))
    is_3d = rng.random() < ranges.p_3d
    thickness = float(rng.uniform(*(ranges.slice_3d_mm if is_3d else ranges.slice_2d_mm)))
    gap = 0.0 if is_3d or rng.random() > ranges.p_gap else float(rng.uniform(0.1, 0.5) * thickness)
    thickness, gap = round(thickness, 3), round(gap, 3)
    matrix, inplane = _draw_inplane(rng, ranges)
    fov_centre = joint_centre + rng.uniform(-8, 8, 3) + np.array([0, 0, rng.uniform(0, 15)]) + \
        variation.get("fov_shift_mm", 0.0)
    t1_grid = _sagittal_grid(rng, fov_centre, ranges, thickness, gap, matrix, inplane, oblique)
    seriesno = iter(range(2, 100))
    t1 = Acquisition(t1_grid, thickness, SeriesInfo(
        description=str(rng.choice(["SAG T1 TSE", "t1_tse_sag", "Sag T1", "SAG_T1_SE", ""])),
        number=next(seriesno), repetition_time_ms=round(float(rng.uniform(400, 750)), 1),
        echo_time_ms=round(float(rng.uniform(8, 20)), 1), acquisition="3D" if is_3d else "2D", thickness_mm=thickness,
        uid=_uid(seed, index, "t1")), "T1")
    if rng.random() < ranges.p_t2_other_grid:
        matrix2, inplane2 = _draw_inplane(rng, ranges)
        thick2 = round(float(np.clip(thickness + rng.uniform(-0.6, 0.8), 0.7, 4.0)), 3)
        gap2 = 0.0 if is_3d else round(gap * rng.uniform(0.5, 1.5), 3)
        t2_grid = _sagittal_grid(rng, fov_centre + rng.uniform(-3, 3, 3), ranges, thick2, gap2, matrix2, inplane2,
                                 oblique)
    else:
        thick2, t2_grid = thickness, t1_grid
    t2 = Acquisition(t2_grid, thick2, SeriesInfo(
        description=str(rng.choice(["SAG T2 FS", "t2_tse_fs_sag", "Sag T2 FSE", "SAG FS", ""])),
        number=next(seriesno), repetition_time_ms=round(float(rng.uniform(2500, 4500)), 1),
        echo_time_ms=round(float(rng.uniform(60, 100)), 1), acquisition="3D" if is_3d else "2D", thickness_mm=thick2,
        uid=_uid(seed, index, "t2"), scan_options=("FS",)), "T2")
    return oblique, fov_centre, t1, t2, seriesno


def _protocol_series(prng, rng, seed: int, index: int, ranges: ProtocolRanges, t1, t2, fov_centre, oblique,
                     side: str):
    """The protocol (``mixed``: one drawn per subject) and its series, each at its field strength."""
    protocol = str(prng.choice(MIXED)) if ranges.protocol == "mixed" else ranges.protocol
    field_t = float(prng.choice([1.5, 3.0]))
    if protocol == "clinical":
        for acq, fat in ((t1, ""), (t2, "FS")):
            acq.series.field_t = field_t
            if not LEGACY_CLINICAL:
                acq.sequence = physics.Sequence("SE", acq.series.repetition_time_ms, acq.series.echo_time_ms,
                                                fat=fat, field_t=field_t)
    elif protocol == "oai":
        t1, t2 = _oai_series(rng, seed, index, fov_centre, ranges, oblique, side)
    elif protocol == "skmtea":
        t1, t2 = _skmtea_series(prng, seed, index, fov_centre, ranges, oblique), None
    elif protocol in SINGLE_SERIES:
        t1, t2 = _single_series(prng, protocol, t1, field_t, seed, index), None
    else:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    return protocol, t1, t2


def _extra_series(rng, seed: int, index: int, ranges: ProtocolRanges, fov_centre, oblique, seriesno) -> list:
    """Series ingest must leave out: an axial fat-suppressed PD, and a sagittal localizer that must
    not win over the diagnostic T1."""
    axial = np.stack([np.array([0.0, 0.0, -1.0]), np.array([0.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0])], 1)
    n_ax, m_ax, sp_ax = 20, 160, 0.9
    shape = (n_ax, m_ax, m_ax)
    spacing = np.array([3.5, sp_ax, sp_ax])
    origin = fov_centre - axial @ ((np.asarray(shape) - 1) / 2.0 * spacing)
    extras = [Acquisition(Grid.from_parts(shape, spacing, origin, axial), 3.0, SeriesInfo(
        description="AX PD FS", number=next(seriesno), repetition_time_ms=3000.0, echo_time_ms=30.0,
        acquisition="2D", thickness_mm=3.0, uid=_uid(seed, index, "ax"), scan_options=("FS",)), "PD")]
    loc = _sagittal_grid(rng, fov_centre, replace(ranges, coverage_lr_mm=(30.0, 30.0)), 10.0, 0.0, 128, 1.2, oblique)
    extras.append(Acquisition(loc, 10.0, SeriesInfo(
        description="localizer", number=1, repetition_time_ms=8.6, echo_time_ms=4.0, acquisition="2D",
        thickness_mm=10.0, uid=_uid(seed, index, "loc"), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        scanning_sequence=("GR",), sequence_variant=("SP",), sequence_name="*fl2d1", flip_angle_deg=20.0), "T1"))
    return extras


def _identity(rng, seed: int, index: int, sex: str, age: int) -> tuple[str, date, dict, dict]:
    """The DICOM identity a real study would carry (invented names, IDs, dates): what the store must
    never let out."""
    subject_id = f"9{rng.integers(0, 10**6):06d}"
    study_date = date(2004, 1, 1) + timedelta(days=int(rng.integers(0, 3000)))
    birth = study_date - timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
    patient = {
        "PatientName": f"{rng.choice(LAST)}^{rng.choice(FIRST)}",
        "PatientID": subject_id,
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "PatientSex": sex,
        "PatientAge": f"{age:03d}Y",
    }
    study = {
        "StudyInstanceUID": _uid(seed, index, "study"),
        "StudyDate": study_date.strftime("%Y%m%d"),
        "StudyTime": f"{rng.integers(7, 19):02d}{rng.integers(0, 60):02d}00",
        "StudyID": f"{rng.integers(1, 10**4)}",
        "AccessionNumber": f"A{rng.integers(0, 10**8):08d}",
        "InstitutionName": f"Synthetic Imaging Center {rng.integers(1, 9)}",
        "ReferringPhysicianName": f"{rng.choice(LAST)}^{rng.choice(FIRST)}",
        "FrameOfReferenceUID": _uid(seed, index, "for"),
        "StudyDescription": "MRI KNEE",
    }
    return subject_id, study_date, patient, study


# Longitudinal change of the synthetic cohort, per year since baseline (the OAI's visits are
# 0, 12, 24, 36, 48 months). OA knees lose cartilage thickness on every plate and gain effusion;
# normal knees keep both, and differ between visits only by repositioning (measurement noise).
# Rates of this size are seen in fast-progressing OAI knees (cartilage loss of several % a
# year in the worst quartile); they are set large enough to be recovered from a small cohort.
OA_CARTILAGE_CHANGE_PER_YEAR = -0.05  # fraction of the baseline thickness
OA_EFFUSION_CHANGE_PER_YEAR = 0.20  # fraction of the baseline effusion scale
REPOSITION_DEG, REPOSITION_MM = 1.5, 1.5  # knee placement between visits, at most


def plan_visit(plan: SubjectPlan, months: int) -> SubjectPlan:
    """The same subject's study ``months`` after its baseline ``plan``: new UIDs and date,
    the age and the anatomy moved on (OA: cartilage thinner, more effusion), the knee placed
    in the coil a little differently. ``months=0`` is the baseline itself."""
    if months == 0:
        return plan
    seed, index = plan.seed
    rng = np.random.default_rng([seed, index, 7, months])
    years = months / 12.0
    anatomy = replace(plan.anatomy)
    if plan.group == "OA":
        thin = 1.0 + OA_CARTILAGE_CHANGE_PER_YEAR * years
        for name in ("cart_femoral_mm", "cart_medial_tibial_mm", "cart_lateral_tibial_mm", "cart_patellar_mm"):
            setattr(anatomy, name, getattr(anatomy, name) * thin)
        anatomy.effusion_scale = plan.anatomy.effusion_scale * (1.0 + OA_EFFUSION_CHANGE_PER_YEAR * years)
    turn = _rotation(*rng.uniform(-REPOSITION_DEG, REPOSITION_DEG, 3))
    pose = replace(plan.pose, rotation=turn @ plan.pose.rotation,
                   translation=plan.pose.translation + rng.uniform(-REPOSITION_MM, REPOSITION_MM, 3))

    def renamed(acq: Acquisition | None, what: str) -> Acquisition | None:
        if acq is None:
            return None
        return replace(acq, series=replace(acq.series, uid=_uid(seed, index, f"{what}-m{months}")))

    day = plan.study_date + timedelta(days=round(months * 365.25 / 12))
    age = plan.age + months // 12
    study_uid = _uid(seed, index, f"study-m{months}")
    study = {**plan.study, "StudyInstanceUID": study_uid, "StudyDate": day.strftime("%Y%m%d"),
             "AccessionNumber": f"A{rng.integers(0, 10**8):08d}", "FrameOfReferenceUID": _uid(seed, index, f"for-m{months}")}
    return _in_protocol(replace(
        plan, age=age, anatomy=anatomy, pose=pose, study_uid=study_uid, study_date=day, visit=f"{months:02d}m",
        patient={**plan.patient, "PatientAge": f"{age:03d}Y"}, study=study, t1=renamed(plan.t1, "t1"),
        t2=renamed(plan.t2, "t2"), extras=[renamed(a, f"x{i}") for i, a in enumerate(plan.extras)],
        seed=(seed, index, months)))  # its own image noise


def _oai_series(rng, seed, index, centre, ranges: ProtocolRanges, oblique, side: str):
    """The OAI's two sagittal series, with headers as its Siemens scanners write them
    (the knee's side is in the series description, as in the OAI)."""
    dess_mm = round(float(rng.uniform(*ranges.slice_3d_mm)), 3)
    matrix, inplane = _draw_inplane(rng, ranges)
    dess = Acquisition(_sagittal_grid(rng, centre, ranges, dess_mm, 0.0, matrix, inplane, oblique), dess_mm, SeriesInfo(
        description=f"SAG_3D_DESS_{side}", number=2, repetition_time_ms=16.3, echo_time_ms=4.7, acquisition="3D",
        thickness_mm=dess_mm, uid=_uid(seed, index, "t1"), scanning_sequence=("GR",), sequence_variant=("SP", "OSP"),
        scan_options=("WE",), sequence_name="*de3d1", flip_angle_deg=25.0), "DESS", physics.OAI_DESS)
    iw_mm = round(float(rng.uniform(*ranges.slice_2d_mm)), 3)
    matrix, inplane = _draw_inplane(rng, ranges)
    iw = Acquisition(_sagittal_grid(rng, centre, ranges, iw_mm, 0.0, matrix, inplane, oblique), iw_mm, SeriesInfo(
        description=f"SAG_IW_TSE_{side}", number=3, repetition_time_ms=3200.0, echo_time_ms=30.0, acquisition="2D",
        thickness_mm=iw_mm, uid=_uid(seed, index, "t2"), scanning_sequence=("SE",),
        sequence_variant=("SK", "SP", "OSP"), scan_options=("FS",), sequence_name="*tse2d1_5",
        flip_angle_deg=180.0), "PDFS", physics.OAI_IW_TSE_FS)
    return dess, iw


def draw_variation(rng, mode: str, group: str, severity: float) -> dict:
    """Anatomy and pose beyond the typical knee (Anatomy field -> value; ``size``, ``fov_shift_mm``)."""
    if mode == "typical":
        return {}
    oa = group == "OA"
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    side = float(rng.choice([-1.0, 1.0]))
    if mode == "extreme":
        return dict(flexion_deg=u(25, 30), varus_deg=-u(6, 8), patella_height_mm=u(8, 10),
                    patella_tilt_deg=side * u(6, 10), effusion_scale=u(8.0, 10.0), popliteal_cyst_mm=u(8, 12),
                    meniscus_extrusion_mm=u(3, 4), meniscus_tear_deg=side * u(60, 160),
                    fibula_shift_mm=tuple(rng.normal(0, 2.5, 3)), condyle_scale=tuple(rng.normal(1.0, 0.05, 2)),
                    plateau_scale=float(rng.normal(1.0, 0.05)), size=float(rng.choice([0.82, 1.18])),
                    fat_mm=u(3, 20), fov_shift_mm=rng.uniform(-20, 20, 3))
    return dict(
        flexion_deg=u(0, 30), varus_deg=float(np.clip(rng.normal(2.0 * severity, 3.0), -8, 8)),
        patella_height_mm=float(np.clip(rng.normal(0, 4), -8, 10)),
        patella_tilt_deg=float(np.clip(rng.normal(0, 4), -10, 10)),
        effusion_scale=u(1.0, 8.0) if oa else u(0.0, 2.0),
        popliteal_cyst_mm=u(5, 12) if rng.random() < (0.3 if oa else 0.1) else 0.0,
        meniscus_extrusion_mm=u(0, 4) * severity if oa else u(0, 1),
        meniscus_tear_deg=side * u(60, 160) if rng.random() < (0.35 if oa else 0.05) else None,
        fibula_shift_mm=tuple(rng.normal(0, 2.5, 3)), condyle_scale=tuple(rng.normal(1.0, 0.05, 2)),
        plateau_scale=float(rng.normal(1.0, 0.05)), size=float(np.clip(rng.normal(1.0, 0.07), 0.8, 1.2)),
        muscle_scale=u(0.75, 1.15), fat_mm=u(3, 20), fov_shift_mm=rng.uniform(-20, 20, 3) * [1, 1, 1.5])


def _skmtea_series(rng, seed, index, centre, ranges: ProtocolRanges, oblique) -> Acquisition:
    """SKM-TEA's sagittal qDESS with its GE headers (ScanningSequence RM, no SequenceName)."""
    mm = round(float(rng.uniform(*ranges.slice_3d_mm)), 3)
    matrix, inplane = _draw_inplane(rng, ranges)
    seq = physics.SKMTEA_QDESS
    return Acquisition(_sagittal_grid(rng, centre, ranges, mm, 0.0, matrix, inplane, oblique), mm, SeriesInfo(
        description="Sag DESS Low", number=2, repetition_time_ms=seq.tr_ms, echo_time_ms=seq.te_ms,
        acquisition="3D", thickness_mm=mm, uid=_uid(seed, index, "t1"), scanning_sequence=("RM",),
        sequence_variant=("NONE",), sequence_name="", flip_angle_deg=seq.flip_deg,
        manufacturer="GE MEDICAL SYSTEMS"), "DESS", seq)


def _single_series(rng, protocol: str, like: Acquisition, field_t: float, seed, index) -> Acquisition:
    """One series of a physics contrast on the grid drawn for the clinical T1 (2-D, or 3-D SPACE-like)."""
    family, names = SINGLE_SERIES[protocol]
    seq = physics.draw(family, rng, field_t)
    is_3d = like.series.acquisition == "3D"
    spin_echo = seq.family in ("SE", "IR")
    seq_name = {"SE": "*spc3d1" if is_3d else "*tse2d1_9", "IR": "*tir2d1_12"}[seq.family] if spin_echo else "*fl3d1"
    series = SeriesInfo(
        description=str(rng.choice(names)), number=2, repetition_time_ms=seq.tr_ms, echo_time_ms=seq.te_ms,
        acquisition=like.series.acquisition, thickness_mm=like.thickness_mm, uid=_uid(seed, index, "t1"),
        scanning_sequence=seq.scanning_sequence(), sequence_variant=("SK", "SP", "OSP"),
        scan_options=(seq.fat,) if seq.fat else ("IR",) if seq.family == "IR" else (), sequence_name=seq_name,
        flip_angle_deg=150.0,
        inversion_time_ms=seq.ti_ms, field_t=field_t)
    return Acquisition(like.grid, like.thickness_mm, series, FAMILY_ROLE[family], seq)


FAMILY_ROLE = {name: f["role"] for name, f in physics.FAMILIES.items()}


def _n_sub(thickness_mm: float, inplane_mm: float) -> int:
    """Planes per slice for partial volume: about one per in-plane voxel of thickness, odd."""
    n = int(np.clip(round(thickness_mm / (3 * inplane_mm)), 1, 3))
    return n if n % 2 else n + 1


def render_subject(plan: SubjectPlan):
    """Images for every series plus the truth label map on the T1 grid."""
    rng = np.random.default_rng([*plan.seed, 7])
    jitter_t1 = {k: float(rng.uniform(0.9, 1.1)) for k in ("fat", "muscle", "marrow", "cartilage", "fluid", "body")}
    jitter_t2 = {k: float(rng.uniform(0.9, 1.1)) for k in jitter_t1}
    snr = float(rng.uniform(14, 35))
    bias = float(rng.uniform(0.05, 0.3))
    images = {}
    cache = {}

    def labels_for(acq: Acquisition):
        key = (acq.grid.shape, acq.grid.affine.tobytes(), acq.thickness_mm)
        if key not in cache:
            n = _n_sub(acq.thickness_mm, min(acq.grid.spacing[1:]))
            cache[key] = render_labels(plan.anatomy, plan.pose, acq.grid, acq.thickness_mm, n)
        return cache[key]

    for acq in plan.series():
        labs, cortex = labels_for(acq)
        jitter = jitter_t2 if acq.contrast != "T1" else jitter_t1
        table = acq.contrast if acq.sequence is None else physics.tissue_signal(acq.sequence)
        images[acq.series.uid] = render_image(labs, cortex, acq.grid, table, rng, jitter, snr, bias)
    labs, _ = labels_for(plan.t1)
    truth = labs[labs.shape[0] // 2].copy()
    truth[truth == BODY] = 0
    return images, truth


def write_subject(plan: SubjectPlan, out: Path) -> dict:
    """Render one subject and write its DICOM series and truth. Returns its manifest entry."""
    images, truth = render_subject(plan)
    rng = np.random.default_rng([*plan.seed, 11])
    study_dir = out / "dicom" / plan.visit / plan.subject_id / plan.study_date.strftime("%Y%m%d")
    series_entries = {}
    roles = {id(plan.t1): "t1", id(plan.t2): "t2"}
    for acq in plan.series():
        folder = study_dir / f"{rng.integers(10**7, 10**8)}"
        n = acq.grid.shape[0]
        order = rng.permutation(n) if plan.shuffle_files else None
        write_series(folder, images[acq.series.uid], acq.grid, acq.series, plan.patient, plan.study, order)
        series_entries[acq.series.uid] = {
            "role": roles.get(id(acq), "other"),  # which of the plan's series: t1 (truth grid), t2, other
            "contrast": acq.contrast,
            "sequence": asdict(acq.sequence) if acq.sequence is not None else None,
            "folder": str(folder.relative_to(out)),
            "shape_zyx": list(acq.grid.shape),
            "affine": acq.grid.affine.tolist(),
            "thickness_mm": acq.thickness_mm,
        }
    truth_dir = out / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    write_label_nifti(truth_dir / f"{plan.study_uid}.nii.gz", truth, plan.t1.grid)
    return {
        "study_uid": plan.study_uid,
        "index": plan.index,
        "t1_series_uid": plan.t1.series.uid,
        "t2_series_uid": plan.t2.series.uid if plan.t2 else None,
        "t2_on_t1_grid": plan.t2.grid.same_as(plan.t1.grid) if plan.t2 else None,
        "protocol": plan.protocol,
        "shuffled_files": plan.shuffle_files,
        "group": plan.group,
        "series": series_entries,
        "anatomy": {**json.loads(json.dumps(asdict(plan.anatomy), default=float)),
                    "scale": list(map(float, plan.pose.scale))},
    }


def clinical_row(plan: SubjectPlan) -> dict:
    return {"subject_id": plan.subject_id, "study_uid": plan.study_uid, "study_date": plan.study.get("StudyDate"),
            "group": plan.group, "age": plan.age, "sex": plan.sex, "kl_grade": plan.kl_grade, "side": plan.side}


def _write_one(args):
    seed, index, ranges, out, months = args
    plan = plan_subject(seed, index, ranges)
    if months is not None:  # a longitudinal cohort: the baseline is the 00m visit
        plan = plan_visit(plan, months) if months else replace(plan, visit="00m")
    return clinical_row(plan), {**write_subject(plan, Path(out)), "visit_months": months or 0}


def generate_cohort(out, n: int, seed: int = 0, preset: str = "clinical", workers: int = 1,
                    progress: bool | None = False, ranges: ProtocolRanges | None = None,
                    protocol: str | None = None, anatomy: str | None = None, visits=(0,)) -> Path:
    """Write ``n`` subjects under ``out``: ``dicom/``, ``truth/``, ``clinical.csv``, ``manifest.json``.

    ``protocol`` (:data:`PROTOCOLS`) sets the series; ``ranges`` overrides preset and protocol;
    ``visits``: months after baseline at which each subject is scanned (a study each, see
    :func:`plan_visit`).
    """
    from kneebatch.outputs import claim_output_dir
    from kneebatch.progress import progress_map

    out = Path(out)
    if n < 1:
        raise ValueError("--n must be at least 1")
    ranges = ranges or ranges_for(preset, protocol, anatomy)
    # a cohort folder holds one cohort: a rerun with the same seed and ranges rewrites the same files
    # (study i is the same for any n), another cohort into it would mix series of both
    visits = sorted({int(m) for m in visits})
    if not visits or visits[0] < 0:
        raise ValueError("--visits are months after baseline: 0 or more")
    settings = json.loads(json.dumps({"seed": seed, "ranges": asdict(ranges), **({"visits": visits} if visits != [0] else {})}))
    claim_output_dir(out, "synth", settings)
    jobs = [(seed, i, ranges, str(out), m if len(visits) > 1 else None) for i in range(n) for m in visits]
    results = progress_map(_write_one, jobs, workers=workers, description="synthesising studies",
                           show=progress)
    rows = [r[0] for r in results]
    with open(out / "clinical.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    manifest = {"seed": seed, "n": n, "visits_months": visits, "preset": preset, "protocol": ranges.protocol,
                "anatomy": ranges.anatomy, "studies": [r[1] for r in results]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out
