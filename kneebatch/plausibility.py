"""Plausibility QC: is a segmented tissue's size one a knee can have?

A tissue's volume relative to the patella's (always imaged whole unless the field of view cuts it,
and scaling with the knee), and the medial against the lateral of a pair, are compared with the
synthetic knees the engines learn from (every anatomy of the ``varied`` range, normal and OA): a
robust z-score of the log ratio against their median and MAD (``benchmarks/plausibility_reference.py``
computes them). Beyond :data:`MAX_ROBUST_Z` the row gets ``implausible:<tissue>`` (or
``implausible:<medial>/<lateral>``) and ``qc_ok`` is False: a meniscus at a third of its size is a
segmentation to look at, not a measurement to pool. The collateral ligaments are not checked:
the field of view often cuts them, so their imaged size says little.

Size alone cannot tell a segmentation that lost 40 % of a meniscus from a small real one: the
varied anatomy (OA, meniscal tears) holds true menisci that far below the median. The engines
can: their confidence in a tissue (the mean probability of the winning label over the voxels
it wins, :func:`kneebatch.inference.segment.confidence`) drops when an image is unlike what
they learned from. :func:`uncertain` compares it with the set's own held-out studies.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

NORMALISER = "patella"
MAX_ROBUST_Z = 3.5  # Iglewicz and Hoaglin's outlier limit for the modified z-score
MIN_SPREAD = 0.1  # of the log ratio (about 10 %): a very tight reference does not flag small differences
# the paired tissues against each other: an error on one side does not shrink the other
PAIRS = (("medial_meniscus", "lateral_meniscus"), ("medial_tibial_cartilage", "lateral_tibial_cartilage"))
CHECKED = ("medial_meniscus", "lateral_meniscus", "acl", "pcl", "patellar_tendon", "femoral_cartilage",
           "medial_tibial_cartilage", "lateral_tibial_cartilage", "patellar_cartilage")
# median and MAD of log(volume / patella volume), and of log(medial / lateral), over the truth of the
# synthetic subjects whose patella the field of view does not cut (train preset, varied anatomy;
# written by benchmarks/plausibility_reference.py --write, with how it was made)
REFERENCE_FILE = Path(__file__).parent / "assets" / "plausibility_reference.json"
_RECORD = json.loads(REFERENCE_FILE.read_text())
REFERENCE: dict[str, tuple[float, float]] = {
    name: (entry["median"], entry["mad"]) for name, entry in _RECORD["log_ratio"].items() if name in CHECKED or "/" in name}
# each plate's mean thickness (mm) over the same knees, all of them (thickness needs no normaliser)
THICKNESS_REFERENCE: dict[str, tuple[float, float]] = {
    name: (entry["median"], entry["mad"]) for name, entry in _RECORD.get("thickness_mean_mm", {}).items()}
MIN_THICKNESS_SPREAD_MM = 0.15  # a voxel's worth of blur does not flag a plate


def robust_z(value: float, median: float, mad: float, min_spread: float = MIN_SPREAD) -> float:
    """(value - median) over the reference's spread (1.4826 MAD, a standard deviation's worth),
    taken as at least ``min_spread``."""
    return (value - median) / max(1.4826 * mad, min_spread)


def implausible(row: dict) -> list[str]:
    """``implausible:<tissue>`` for each checked size ratio beyond :data:`MAX_ROBUST_Z` of the
    reference. Call it only when the patella is whole (not cut by the field of view); a tissue
    that is missing is the ``missing:`` flag's, not this one's."""
    def volume(name):
        return row.get(f"{name}_volume_mm3") or 0.0

    flags = []
    patella = volume(NORMALISER)
    for name in CHECKED:
        if patella > 0 and volume(name) > 0 and abs(robust_z(math.log(volume(name) / patella),
                                                             *REFERENCE[name])) > MAX_ROBUST_Z:
            flags.append(f"implausible:{name}")
    for a, b in PAIRS:
        if volume(a) > 0 and volume(b) > 0 and abs(robust_z(math.log(volume(a) / volume(b)),
                                                            *REFERENCE[f"{a}/{b}"])) > MAX_ROBUST_Z:
            flags.append(f"implausible:{a}/{b}")
    return flags


def uncertain(confidence: dict, reference: dict | None) -> list[str]:
    """``uncertain:<tissue>`` for each tissue whose confidence is below its engine set's reference
    (median and MAD over held-out studies of the set's protocol) by more than
    :data:`MAX_ROBUST_Z`; nothing without a reference (another tool's model, an unrated set)."""
    flags = []
    for name, value in confidence.items():
        if reference and name in reference and value is not None and not math.isnan(value):
            if robust_z(value, *reference[name], MIN_CONFIDENCE_SPREAD) < -MAX_ROBUST_Z:
                flags.append(f"uncertain:{name}")
    return flags


# of the confidence, the least spread a reference is taken to have: its MAD over a dozen studies
# underrates the spread of the tissues held-out studies agree on to a few thousandths. Measured with
# t1-t2 (2026-12-05): 8 typical held-out studies (seed 777002), 0.01 flagged a thin-cartilage and a
# cut-quadriceps study (Dice 0.90, 0.93) and 0.015 none; 8 varied-anatomy studies (seed 777001), on
# which the engines lose up to 78 % of a meniscus: 0.015 flags 7, with 24 of the 26 tissues under
# 0.7 Dice; the eighth's worst tissue is a half-size MCL the engines are sure of (0.963)
MIN_CONFIDENCE_SPREAD = 0.015


def thickness_outlier(plate: str, mean_mm: float) -> bool:
    """A plate's mean thickness beyond :data:`MAX_ROBUST_Z` of the reference knees' (thinner or
    thicker: cartilage segmented as a sliver, or spilling into the joint)."""
    if plate not in THICKNESS_REFERENCE or math.isnan(mean_mm):
        return False
    return abs(robust_z(mean_mm, *THICKNESS_REFERENCE[plate], MIN_THICKNESS_SPREAD_MM)) > MAX_ROBUST_Z
