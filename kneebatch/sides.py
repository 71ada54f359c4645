"""The side rule: the fibula lies lateral.

Both the knee's side (left or right, from the anatomy, :func:`kneebatch.measure.knee_side_from_anatomy`)
and the medial/lateral split of the paired tissues (:mod:`kneebatch.inference.laterality`) come
from where the fibula lies against the tibia or the notch along the left-right axis.
"""

from __future__ import annotations

# the tissues split into a medial and a lateral label
SIDE_PAIRS = (("medial_meniscus", "lateral_meniscus"),
              ("medial_tibial_cartilage", "lateral_tibial_cartilage"),
              ("mcl", "lcl"))
MIN_FIBULA_OFFSET_MM = 10.0  # the fibula's centre lies 25-40 mm lateral of the tibia's and of the notch


def fibula_direction(fibula_at_mm: float | None, reference_at_mm: float | None) -> int | None:
    """Along a left-right axis: +1 when the fibula lies at larger coordinates than the reference
    (the tibia, the notch), -1 at smaller; None when either is missing or they lie closer than
    :data:`MIN_FIBULA_OFFSET_MM` (too close to tell)."""
    if fibula_at_mm is None or reference_at_mm is None or abs(fibula_at_mm - reference_at_mm) < MIN_FIBULA_OFFSET_MM:
        return None
    return 1 if fibula_at_mm > reference_at_mm else -1
