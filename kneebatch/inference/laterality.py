"""Medial and lateral labels kept on their own side of the knee.

The fine net judges each voxel from a window a few centimetres wide along left-right.
The medial and lateral menisci, tibial plates and collateral ligaments look alike in
such a window, and a left knee is a mirrored right knee, so some of one compartment
gets the other's label (on held-out studies: up to a fifth of a meniscus). The whole
crop settles it: the fibula is lateral, and the cruciates run between the compartments.

So, on the working grid's logits (before they are resampled and argmaxed): each side
label is forbidden beyond the cruciates' plane on the wrong side, where its runner-up,
usually its counterpart, takes over; and the fibula keeps only its largest piece, on
the lateral side. A crop whose fibula does not tell the side (none found, or less than
``MIN_FIBULA_OFFSET_MM`` from the cruciates) is left as the net gave it.
"""

from __future__ import annotations

import numpy as np

from kneebatch import labels as L
from kneebatch import ops
from kneebatch.models.preprocess import pad_to_multiple
from kneebatch.sides import SIDE_PAIRS, fibula_direction

FORBIDDEN = -1.0e4  # far below any logit, and finite in float16, so resampling stays finite


def left_right_axis(direction) -> int:
    """Index axis (0, 1, 2 for z, y, x) closest to patient left-right (LPS x)."""
    return int(np.argmax(np.abs(np.asarray(direction, dtype=np.float64)[0])))


def _centre(mask, axis: int) -> float | None:
    """Centroid index of ``mask`` along ``axis``; None when empty."""
    count, at = (float(v) for v in ops.centroid(mask, axes=(axis,)))
    return at if count else None


def lateral_side(labels, axis: int, spacing_mm: float):
    """Bool per index along ``axis``, True on the lateral side of the cruciates (the side of
    the fibula's largest piece); None when the fibula does not tell the side."""
    xp = ops.namespace(labels)
    fibula = ops.largest_component(labels == L.by_name("fibula").id)
    at_fibula = _centre(fibula, axis)
    cruciates = (labels == L.by_name("acl").id) | (labels == L.by_name("pcl").id)
    at_notch = _centre(cruciates, axis)
    if at_notch is None:  # no cruciates: the tibia's centre is close to the notch
        at_notch = _centre(labels == L.by_name("tibia").id, axis)
    direction = fibula_direction(None if at_fibula is None else at_fibula * spacing_mm,
                                 None if at_notch is None else at_notch * spacing_mm)
    if direction is None:
        return None
    index = xp.astype(xp.arange(labels.shape[axis], device=ops.device_of(labels)), xp.float64)
    return index > at_notch if direction > 0 else index < at_notch


def keep_sides(logits, valid, axis: int, spacing_mm: float) -> bool:
    """Forbid, in place, side labels on the wrong side (``logits [K, ...]``, the working crop's
    extent ``valid`` at the start of each axis; any padding beyond is left alone). Returns
    whether the side was found (the logits are untouched if not)."""
    xp = ops.namespace(logits)
    labels = ops.channel_argmax(logits[:, :valid[0], :valid[1], :valid[2]])
    lateral = lateral_side(labels, axis, spacing_mm)
    if lateral is None:
        return False
    padded = tuple(logits.shape[1:])
    fibula = labels == L.by_name("fibula").id
    shape = [1, 1, 1]
    shape[axis] = -1
    side = xp.reshape(lateral, tuple(shape))
    stray = xp.logical_and(fibula, xp.logical_not(ops.largest_component(xp.logical_and(fibula, side))))
    # masks over the padded logits (the padding is never read back)
    side = pad_to_multiple(xp.broadcast_to(side, tuple(labels.shape)), padded)[0]
    stray = pad_to_multiple(stray, padded)[0]
    forbidden = xp.asarray(FORBIDDEN, dtype=logits.dtype, device=ops.device_of(logits))

    def forbid(name, where):
        k = L.by_name(name).id
        logits[k, ...] = xp.where(where, forbidden, logits[k, ...])

    for medial_name, lateral_name in SIDE_PAIRS:
        forbid(medial_name, side)
        forbid(lateral_name, xp.logical_not(side))
    # stray pieces only: forbidding the fibula around its kept piece would bend the
    # interpolated logits there and shrink it
    forbid("fibula", xp.logical_or(stray, xp.logical_not(side)))
    return True
