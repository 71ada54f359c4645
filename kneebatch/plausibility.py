"""Plausibility QC: is a segmented tissue's size one a knee can have?

A tissue's volume relative to the patella's (always imaged whole unless the field of view cuts it,
and scaling with the knee), and the medial against the lateral of a pair, are compared with the
synthetic knees the engines learn from (every anatomy of the ``varied`` range, normal and OA): a
robust z-score of the log ratio against their median and MAD (``benchmarks/plausibility_reference.py``
computes them). Beyond :data:`MAX_ROBUST_Z` the row gets ``implausible:<tissue>`` (or
``implausible:<medial>/<lateral>``) and ``qc_ok`` is False: a meniscus at a third of its size is a
segmentation to look at, not a measurement to pool. The collateral ligaments are not checked:
the field of view often cuts them, so their imaged size says little.
"""

from __future__ import annotations

import math

NORMALISER = "patella"
MAX_ROBUST_Z = 3.5  # Iglewicz and Hoaglin's outlier limit for the modified z-score
MIN_SPREAD = 0.1  # of the log ratio (about 10 %): a very tight reference does not flag small differences
# the paired tissues against each other: an error on one side does not shrink the other
PAIRS = (("medial_meniscus", "lateral_meniscus"), ("medial_tibial_cartilage", "lateral_tibial_cartilage"))
CHECKED = ("medial_meniscus", "lateral_meniscus", "acl", "pcl", "patellar_tendon", "femoral_cartilage",
           "medial_tibial_cartilage", "lateral_tibial_cartilage", "patellar_cartilage")
# median and MAD of log(volume / patella volume), and of log(medial / lateral), over the truth of the
# 29 of 40 synthetic subjects whose patella the field of view does not cut (train preset, varied anatomy,
# seed 5150; benchmarks/plausibility_reference.py, 2026-12-05)
REFERENCE: dict[str, tuple[float, float]] = {
    "medial_meniscus": (-2.1821, 0.1337),
    "lateral_meniscus": (-2.7482, 0.1192),
    "acl": (-2.7034, 0.1026),
    "pcl": (-2.2845, 0.075),
    "patellar_tendon": (-1.0079, 0.0741),
    "femoral_cartilage": (0.4151, 0.0988),
    "medial_tibial_cartilage": (-2.0268, 0.192),
    "lateral_tibial_cartilage": (-1.7677, 0.0338),
    "patellar_cartilage": (-0.9719, 0.1176),
    "medial_meniscus/lateral_meniscus": (0.5154, 0.1157),
    "medial_tibial_cartilage/lateral_tibial_cartilage": (-0.2525, 0.1642),
}


def robust_z(value: float, median: float, mad: float) -> float:
    return (value - median) / max(1.4826 * mad, MIN_SPREAD)


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
