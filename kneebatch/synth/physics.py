"""MR signal of the knee's tissues from their relaxation times and a sequence's parameters.

A contrast is a :class:`Sequence` (a parameter set), not a table of grey values: the
synthetic cohort renders its series with :func:`tissue_signal`, and training draws
sequences from :data:`FAMILIES` to show the nets many contrasts.

Tissue properties (approximate, healthy adults; T1/T2 in ms at 1.5 T and 3 T):

- cartilage, synovial fluid, muscle, marrow, subcutaneous fat: Gold et al., "Musculoskeletal
  MRI at 3.0 T: relaxation times and image contrast", AJR 2004;183:343-351 (cartilage
  1024/30 at 1.5 T, 1240/27 at 3 T; fluid 3620/767 and 4813/677; muscle 1008/44 and
  1420/32; marrow 549/49 and 586/49; fat 343/58 and 382/68), and Jordan et al., Eur J
  Radiol 2013;82:734 (3 T knee cartilage and meniscus).
- menisci, ligaments, tendon: very short T2 (meniscus ~ 10 ms, ACL ~ 15-20 ms, patellar tendon
  ~ 2-5 ms): Rauscher et al., Radiology 2008;249:591 (meniscus T2 at 3 T); Pai et al., MRI
  2008;26:1215 (ACL). Dark on every conventional sequence.
- cortex: T2* well below 1 ms, so no signal at clinical echo times.
- proton densities are relative to fluid. Each tissue is water plus a fraction of fat (marrow and
  subcutaneous fat mostly fat) with fat's own T1/T2: fat saturation (FS) and water excitation
  (WE) remove the fat share, STIR's inversion (TI near T1(fat) ln 2) nulls it. Turbo spin echo
  lengthens fat's apparent T2 (J-coupling), hence the longer fat T2 for spin-echo trains.

Signal equations (the usual textbook forms; Bernstein, King & Zhou, "Handbook of MRI
Pulse Sequences", 2004): spin echo ``PD (1 - e^(-TR/T1)) e^(-TE/T2)``; inversion recovery
``PD |1 - 2 e^(-TI/T1) + e^(-TR/T1)| e^(-TE/T2)``; spoiled gradient echo (Ernst)
``PD sin a (1 - E1) / (1 - cos a E1) e^(-TE/T2*)``. DESS is approximated as the sum of
its two echoes: the FISP echo as a spoiled gradient echo, the PSIF echo as the
steady-state free-precession amplitude ``PD sin a / ((1 + cos a) + (1 - cos a) T1/T2)``
attenuated by ``e^(-(2 TR - TE)/T2)``: fluid brightest, cartilage bright against
dark fat (with WE), menisci and ligaments dark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

# kind: ({field_T: (T1 ms, T2 ms) of its water}, proton density, fat fraction). A tissue's signal is
# its water's plus, in proportion to the fat fraction, fat's (FAT_RELAXATION): fat saturation, water
# excitation and STIR's inversion act on the fat share only.
TISSUES = {
    "air": ({1.5: (1.0, 1.0), 3.0: (1.0, 1.0)}, 0.0, 0.0),
    "fluid": ({1.5: (3620.0, 767.0), 3.0: (4813.0, 677.0)}, 1.0, 0.0),
    "cartilage": ({1.5: (1024.0, 30.0), 3.0: (1240.0, 27.0)}, 0.75, 0.0),
    "muscle": ({1.5: (1008.0, 44.0), 3.0: (1420.0, 32.0)}, 0.70, 0.03),
    "marrow": ({1.5: (1000.0, 40.0), 3.0: (1200.0, 35.0)}, 0.85, 0.85),  # yellow marrow: mostly fat
    "fat": ({1.5: (1000.0, 40.0), 3.0: (1200.0, 35.0)}, 0.90, 0.95),
    # unlabelled soft tissue inside the skin (Hoffa's and popliteal fat with septa)
    "body": ({1.5: (1000.0, 40.0), 3.0: (1200.0, 35.0)}, 0.85, 0.80),
    "meniscus": ({1.5: (1000.0, 10.0), 3.0: (1100.0, 10.0)}, 0.60, 0.0),
    "ligament": ({1.5: (1000.0, 18.0), 3.0: (1100.0, 16.0)}, 0.60, 0.0),
    "tendon": ({1.5: (800.0, 4.0), 3.0: (900.0, 3.5)}, 0.50, 0.0),
    "cortex": ({1.5: (1000.0, 0.4), 3.0: (1000.0, 0.4)}, 0.10, 0.0),
}
FAT_RELAXATION = {1.5: (343.0, 58.0), 3.0: (382.0, 68.0)}  # subcutaneous fat (Gold et al. 2004)
KINDS = tuple(TISSUES)
TSE_FAT_T2_FACTOR = 2.0  # J-coupling: fat looks ~2x longer T2 in a spin-echo train
FAT_RESIDUAL = 0.08  # what FS/WE leaves of fat signal


@dataclass(frozen=True)
class Sequence:
    """One acquisition's contrast parameters."""

    family: str  # SE (incl. TSE), IR, GRE, DESS
    tr_ms: float
    te_ms: float
    flip_deg: float = 90.0
    ti_ms: float = 0.0
    fat: str = ""  # "", "FS" (fat saturation) or "WE" (water excitation)
    field_t: float = 3.0

    def scanning_sequence(self) -> tuple:
        """DICOM (0018,0020) as scanners write it."""
        return {"SE": ("SE",), "IR": ("IR", "SE"), "GRE": ("GR",), "DESS": ("GR",)}[self.family]


def _interpolate(times: dict, field_t: float) -> tuple[float, float]:
    lo, hi = times[1.5], times[3.0]
    w = float(np.clip((field_t - 1.5) / 1.5, 0.0, 1.0))
    return lo[0] + w * (hi[0] - lo[0]), lo[1] + w * (hi[1] - lo[1])


def fat_t1_ms(field_t: float) -> float:
    return _interpolate(FAT_RELAXATION, field_t)[0]


def _component(seq: Sequence, t1: float, t2: float) -> float:
    """Signal of unit proton density with relaxation ``t1``/``t2`` (ms)."""
    a = math.radians(seq.flip_deg)
    e1, e2 = math.exp(-seq.tr_ms / t1), math.exp(-seq.te_ms / t2)
    if seq.family == "SE":
        return (1 - e1) * e2
    if seq.family == "IR":
        return abs(1 - 2 * math.exp(-seq.ti_ms / t1) + e1) * e2
    fisp = math.sin(a) * (1 - e1) / (1 - math.cos(a) * e1) * math.exp(-seq.te_ms / (0.7 * t2))
    if seq.family == "GRE":
        return fisp
    if seq.family == "DESS":
        ssfp = math.sin(a) / ((1 + math.cos(a)) + (1 - math.cos(a)) * t1 / t2)
        return fisp + ssfp * math.exp(-(2 * seq.tr_ms - seq.te_ms) / t2)
    raise ValueError(f"unknown sequence family {seq.family!r}")


def tissue_signal(seq: Sequence) -> dict[str, float]:
    """Relative signal per tissue kind, scaled so the brightest tissue is 0.9."""
    fat_t1, fat_t2 = _interpolate(FAT_RELAXATION, seq.field_t)
    if seq.family in ("SE", "IR"):  # fat's T2 is longer in a spin-echo train
        fat_t2 *= TSE_FAT_T2_FACTOR
    fat_signal = _component(seq, fat_t1, fat_t2) * (FAT_RESIDUAL if seq.fat else 1.0)
    out = {}
    for kind, (times, pd, fat) in TISSUES.items():
        if kind == "air":
            out[kind] = 0.0
            continue
        t1, t2 = _interpolate(times, seq.field_t)
        out[kind] = pd * ((1 - fat) * _component(seq, t1, t2) + fat * fat_signal)
    top = max(out.values())
    return {k: 0.9 * v / top for k, v in out.items()}


# Named contrasts with the ranges scanners use; ``draw`` picks one parameter set.
# role: what kneebatch.ingest.roles should call a series with these headers.
FAMILIES = {
    "T1_TSE": dict(family="SE", tr=(400, 750), te=(8, 20), fat="", role="T1"),
    "T2_TSE": dict(family="SE", tr=(2500, 4500), te=(60, 100), fat="", role="T2"),
    "T2_TSE_FS": dict(family="SE", tr=(2500, 4500), te=(60, 100), fat="FS", role="T2FS"),
    "PD_TSE": dict(family="SE", tr=(2000, 4000), te=(20, 40), fat="", role="PD"),
    "PD_TSE_FS": dict(family="SE", tr=(2000, 4000), te=(25, 45), fat="FS", role="PDFS"),
    "DESS_WE": dict(family="DESS", tr=(14, 20), te=(4, 6), flip=(20, 30), fat="WE", role="DESS"),
    # inversion recovery's contrast is set by TI, not TR/TE: kneebatch.ingest.roles calls it "other"
    "STIR": dict(family="IR", tr=(3500, 5500), te=(30, 50), ti=(0.92, 1.08), fat="", role="other"),
    "T1_GRE_FS": dict(family="GRE", tr=(12, 25), te=(4, 8), flip=(10, 25), fat="WE", role="GRE3D"),
}


def draw(name: str, rng: np.random.Generator, field_t: float | None = None) -> Sequence:
    f = FAMILIES[name]
    field_t = field_t if field_t is not None else float(rng.choice([1.5, 3.0]))
    u = lambda r: float(rng.uniform(*r))  # noqa: E731
    # STIR: about fat's null point, T1(fat) ln 2 (long TR), which moves with the field
    ti = fat_t1_ms(field_t) * math.log(2) * u(f["ti"]) if "ti" in f else 0.0
    return Sequence(f["family"], round(u(f["tr"]), 1), round(u(f["te"]), 1), round(u(f["flip"]), 1) if "flip" in f else
                    90.0, round(ti, 1), f["fat"], field_t)


# The OAI's and SKM-TEA's fixed protocols (FACTS.md; Peterfy et al. 2008; Desai et al. 2021)
OAI_DESS = Sequence("DESS", 16.3, 4.7, 25.0, fat="WE", field_t=3.0)
OAI_IW_TSE_FS = Sequence("SE", 3200.0, 30.0, 180.0, fat="FS", field_t=3.0)
# SKM-TEA's GE qDESS headers: TR 20.36 ms, TE 6.428 ms, flip 20 deg, no fat-suppression option
SKMTEA_QDESS = Sequence("DESS", 20.36, 6.428, 20.0, fat="", field_t=3.0)


def with_field(seq: Sequence, field_t: float) -> Sequence:
    return replace(seq, field_t=field_t)
