"""OA cartilage subregions (Wirth & Eckstein 2008) and 2-D thickness maps of one knee.

The OAI's cartilage endpoints are reported per subregion, not per plate (Wirth W, Eckstein F.
IEEE Trans Med Imaging 2008;27:737-744):

- each tibial plate (MT, LT) has a central region ``c``: an ellipse about the centre of
  gravity of the plate's area, shaped like the plate (its axes in proportion to the plate's
  medio-lateral and antero-posterior extent) and covering 20 % of it; the rest is cut by the
  diagonals of the plate's bounding rectangle into anterior ``a``, posterior ``p``, external
  ``e`` (away from the notch) and internal ``i`` (towards it): cMT, aMT, pMT, eMT, iMT and
  the same for LT;
- the femoral condyles have a central, weight-bearing region (cMF, cLF) from the trochlear
  notch to 60 % of the way to the posterior end of the condyle's cartilage, and a posterior
  region (pMF, pLF) beyond; cartilage anterior of the notch is the trochlea (TrF). The central
  region is also reported in three medio-lateral thirds of equal width (ecMF, ccMF, icMF and
  the same for LF: external, central, internal, the internal third towards the notch); the
  thirds add up to cMF / cLF. The width is the central region's cartilage's (2nd to 98th
  percentile of its voxels' medio-lateral positions), cut once per condyle: implementations
  that cut each antero-posterior position by its own width differ where a condyle narrows.

A label map has no landmarks, so the frame and the notch come from the labels: medial points
from the lateral to the medial tibial plate (or, with a plate missing, from the knee side),
superior is the patient's, anterior completes the frame. The trochlear notch of each condyle
is taken at the anterior edge of that side's tibial plate: in extension, as the OAI and most
cohorts image the knee, the terminal sulcus that ends the trochlea rests on the anterior
horn of the meniscus, at the front of the plateau.

Thickness is read from 2-D maps: the tibia seen from above (medio-lateral x antero-posterior)
and the femur unrolled about a medio-lateral axis through its condyles (medio-lateral x angle).
A map pixel holds the thickest articular-surface sample that projects into it (the distance
to the plate's bone, as :mod:`kneebatch.measure` measures a plate); pixels are at least 1.5
voxels wide along each map axis, so a voxel surface leaves no sampling gaps. A plate's area
is its covered pixels with enclosed holes filled; the holes are denuded bone, counted as
``denuded_area_pct`` of the region's area (dABp). A denuded area open to the plate's margin
cannot be told from the margin and is not counted. Volumes count every voxel of a plate, each
in the region its position falls in, so the regions of a plate add up to the plate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from . import labels as L
from . import ops
from .geometry import Grid

CENTRAL_AREA_SHARE = 0.20  # the central tibial ellipse covers 20 % of the plate (Wirth & Eckstein)
CENTRAL_FEMUR_SHARE = 0.60  # cMF/cLF end 60 % of the way from the notch to the posterior end
MAP_PIXEL_MM = 0.5  # finest map pixel; coarser where the voxels are
PIXEL_PER_VOXEL = 1.5  # map pixels span 1.5 voxels: every pixel of a surface gets a sample
EDGE_PERCENTILE = 2.0
NEAR_AXIS_PERCENTILE = 10.0  # plate edges from robust percentiles, not single stray voxels
THICKNESS_MAX_MM = 8.0  # as measure's plausible range: farther samples are strays
MIN_DENUDED_MM2 = 4.0  # a 2 x 2 mm lesion; smaller holes in a map are gaps between voxel samples

FEMORAL_REGIONS, TIBIAL_REGIONS, REGIONS = L.FEMORAL_REGIONS, L.TIBIAL_REGIONS, L.CARTILAGE_REGIONS
THIRDS = L.CENTRAL_FEMUR_THIRDS

REGION_DOC = {
    "TrF": "trochlea: femoral cartilage anterior of the trochlear notch",
    "cMF": "central (weight-bearing) medial femur", "pMF": "posterior medial femur",
    "cLF": "central (weight-bearing) lateral femur", "pLF": "posterior lateral femur",
    **{f"{t}c{c}F": f"{third} third of the central {condyle} femur"
       for c, condyle in (("M", "medial"), ("L", "lateral"))
       for t, third in (("e", "external"), ("c", "central"), ("i", "internal (towards the notch)"))},
    **{f"{r}{p}": f"{where} {plate} tibia" for p, plate in (("MT", "medial"), ("LT", "lateral"))
       for r, where in (("c", "central"), ("a", "anterior"), ("p", "posterior"), ("e", "external"), ("i", "internal"))},
}
STAT_DOC = {
    "thickness_mean_mm": ("mm", "mean cartilage thickness over the region's covered area (map pixels, its rim and "
                                "denuded area left out); NaN if absent"),
    "thickness_p95_mm": ("mm", "95th percentile of that thickness; NaN if absent"),
    "thickness_min_mm": ("mm", "smallest thickness of the covered area; NaN if absent"),
    "denuded_area_pct": ("%", "share of the region's area that is denuded bone (enclosed holes of at least 4 mm2 "
                              "in the plate); NaN if absent"),
    "volume_mm3": ("mm3", "cartilage voxels whose position falls in the region x voxel volume"),
    "volume_ml": ("mL", "that volume in millilitres (mm3 / 1000)"),
}

PLATES = {"MT": "medial_tibial_cartilage", "LT": "lateral_tibial_cartilage"}
FEMORAL = "femoral_cartilage"


@dataclass(frozen=True)
class Frame:
    """The knee's anatomical axes in LPS world coordinates (unit vectors)."""

    medial: np.ndarray
    anterior: np.ndarray
    superior: np.ndarray

    def coords(self, points: np.ndarray) -> np.ndarray:
        """``(N, 3)`` world points as (medial, anterior, superior) mm."""
        return points @ np.stack([self.medial, self.anterior, self.superior], axis=1)


@dataclass
class ThicknessMap:
    """One 2-D map: ``thickness`` mm (NaN off the plate, 0 where denuded), ``region`` index into
    :data:`REGIONS` (-1 off the plate), each pixel's area on the bone (mm2), the axes' names and
    pixel sizes (mm, or degrees); ``thirds``: the central femur's thirds (-1 elsewhere)."""

    thickness: np.ndarray
    region: np.ndarray
    area_mm2: np.ndarray
    axes: tuple[str, str]
    pixel: tuple[float, float]
    thirds: np.ndarray | None = None

    def finest(self) -> np.ndarray:
        """Each pixel's smallest region: a third of c?F where it has one."""
        return self.region if self.thirds is None else np.where(self.thirds >= 0, self.thirds, self.region)


@dataclass
class RegionalResult:
    values: dict  # "<region>_<stat>" -> float, every region and stat
    maps: dict  # "tibia" / "femur" -> ThicknessMap


REGION_STATS = tuple(STAT_DOC)


def columns() -> list[str]:
    return [f"{region}_{stat}" for region in REGIONS for stat in REGION_STATS]


def empty_values() -> dict:
    return {name: (0.0 if name.endswith(("_mm3", "_ml")) else math.nan) for name in columns()}


def _orthonormal(v: np.ndarray, *against: np.ndarray) -> np.ndarray | None:
    for w in against:
        v = v - (v @ w) * w
    n = float(np.linalg.norm(v))
    return None if n < 1e-6 else v / n


def frame(centroids: dict, knee_side: str | None) -> Frame | None:
    """Axes from the tibial plates' centroids (world mm), or from the knee side when a plate is
    missing (LPS x grows to the patient's left: a right knee's medial side); None without either."""
    superior = np.array([0.0, 0.0, 1.0])
    if all(centroids.get(p) is not None for p in PLATES):
        medial = _orthonormal(centroids["MT"] - centroids["LT"], superior)
    elif knee_side in ("left", "right"):
        medial = np.array([1.0 if knee_side == "right" else -1.0, 0.0, 0.0])
    else:
        return None
    if medial is None:
        return None
    anterior = _orthonormal(np.array([0.0, -1.0, 0.0]), medial, superior)
    if anterior is None:
        return None
    return Frame(medial, anterior, superior)


def _pixel_sizes(grid: Grid, axes: list[np.ndarray]) -> list[float]:
    """Map pixel (mm) along each world axis: 1.5 x a voxel's extent along it, at least 0.5 mm."""
    step = np.abs(grid.direction.T @ np.stack(axes, axis=1)) * np.asarray(grid.spacing)[:, None]
    return [max(MAP_PIXEL_MM, PIXEL_PER_VOXEL * float(e)) for e in step.sum(axis=0)]


def _surface_samples(labels: np.ndarray, grid: Grid, plate: str):
    """World points of the plate's articular surface and their distance to its bone (mm)."""
    label = L.by_name(plate)
    cart = labels == label.id
    bone = labels == L.by_name(label.bone).id
    if not cart.any() or not bone.any():
        return np.zeros((0, 3)), np.zeros(0)
    articular = ops.surface(cart, exclude=bone)
    dist = ops.distances_to(bone, articular, grid.spacing)
    keep = dist <= THICKNESS_MAX_MM
    return grid.index_to_world(np.argwhere(articular)[keep]), dist[keep]


def _rasterise(uv: np.ndarray, values: np.ndarray, pixel, lo, shape) -> np.ndarray:
    """Per pixel the index of its median sample (several surface voxels project into one), -1
    where no sample falls."""
    ij = np.floor((uv - lo) / np.asarray(pixel)).astype(np.int64)
    flat = ij[:, 0] * shape[1] + ij[:, 1]
    order = np.lexsort((values, flat))  # grouped by pixel, each group sorted by value
    flat_sorted = flat[order]
    starts = np.flatnonzero(np.r_[True, flat_sorted[1:] != flat_sorted[:-1]])
    counts = np.diff(np.r_[starts, len(order)])
    pick = order[starts + (counts - 1) // 2]  # the (lower) median sample of each pixel
    picked = np.full(shape[0] * shape[1], -1, dtype=np.int64)
    picked[flat[pick]] = pick
    return picked.reshape(shape)


def _gather(values: np.ndarray, picked: np.ndarray, missing):
    out = np.full(picked.shape, missing, dtype=np.result_type(values, type(missing)))
    out[picked >= 0] = values[picked[picked >= 0]]
    return out


def _fill(thickness: np.ndarray, region: np.ndarray, groups, pixel_mm2: float, *carried) -> None:
    """Enclosed holes of each group of regions join the nearest covered region of that group (in
    place, with the ``carried`` per-pixel arrays): a hole of at least MIN_DENUDED_MM2 is denuded
    bone (0 mm), a smaller one a sampling gap of the voxel surface, given its neighbour's thickness."""
    for group in groups:
        covered = np.isin(region, group)
        holes = ndimage.binary_fill_holes(covered) & ~covered
        if not holes.any():
            continue
        _, (ni, nj) = ndimage.distance_transform_edt(~covered, return_indices=True)
        for array in (region, *carried):
            array[holes] = array[ni[holes], nj[holes]]
        pieces, _ = ndimage.label(holes)
        small = np.isin(pieces, 1 + np.flatnonzero(np.bincount(pieces.ravel())[1:] * pixel_mm2 < MIN_DENUDED_MM2))
        thickness[holes] = 0.0
        thickness[small] = thickness[ni[small], nj[small]]


def _pixel_centres(lo, shape, pixel) -> np.ndarray:
    """``(N, 2)`` map coordinates of every pixel's centre, in row-major order."""
    return lo + (np.argwhere(np.ones(shape, bool)) + 0.5) * np.asarray(pixel)


def _grid_for(uv: np.ndarray, pixel):
    lo = uv.min(axis=0) - np.asarray(pixel)
    shape = tuple(int(n) for n in np.ceil((uv.max(axis=0) - lo) / np.asarray(pixel)) + 2)
    return lo, shape


class _TibialRule:
    """Wirth & Eckstein's five regions of one plate, from its covered area (u medial, v anterior)."""

    def __init__(self, name: str, uv_pixels: np.ndarray, pixel_area: float, other_u: float | None):
        self.name = name
        self.centre = uv_pixels.mean(axis=0)
        lo, self.high = np.percentile(uv_pixels, [EDGE_PERCENTILE, 100 - EDGE_PERCENTILE], axis=0)
        self.half = np.maximum((self.high - lo) / 2, 1e-3)
        area = len(uv_pixels) * pixel_area
        # ellipse (k * half_u, k * half_v) of 20 % of the area
        self.k = math.sqrt(CENTRAL_AREA_SHARE * area / (math.pi * self.half[0] * self.half[1]))
        # internal points towards the other plate (the notch); without it, towards the midline
        towards = (other_u - self.centre[0]) if other_u is not None else (-1.0 if name == "MT" else 1.0)
        self.internal_sign = 1.0 if towards > 0 else -1.0

    def assign(self, uv: np.ndarray) -> np.ndarray:
        d = (uv - self.centre) / self.half
        central = (d[:, 0] ** 2 + d[:, 1] ** 2) <= self.k ** 2
        ap = np.abs(d[:, 1]) >= np.abs(d[:, 0])
        names = np.where(ap, np.where(d[:, 1] > 0, "a", "p"),
                         np.where(d[:, 0] * self.internal_sign > 0, "i", "e"))
        names = np.where(central, "c", names)
        return np.array([REGIONS.index(n + self.name) for n in names], dtype=np.int64)


class _FemoralRule:
    """TrF anterior of each condyle's notch, c?F to 60 % of the way to its posterior end, p?F
    beyond; c?F's thirds of equal medio-lateral width (``every``: the plate's voxels)."""

    def __init__(self, split_u: float, notch_v: dict, posterior_v: dict, every: np.ndarray):
        self.split_u, self.notch_v, self.cut_v = split_u, notch_v, {}
        for side in ("M", "L"):
            self.cut_v[side] = notch_v[side] - CENTRAL_FEMUR_SHARE * (notch_v[side] - posterior_v[side])
        self.voxel_regions = self.assign(every)
        self.third_cuts = {}
        for side in ("M", "L"):
            u = every[self.voxel_regions == REGIONS.index(f"c{side}F"), 0]
            if len(u):
                lo, hi = np.percentile(u, [EDGE_PERCENTILE, 100 - EDGE_PERCENTILE])
                self.third_cuts[side] = (lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3)

    def assign(self, uva: np.ndarray) -> np.ndarray:
        u, v = uva[:, 0], uva[:, 1]
        medial = u >= self.split_u
        notch = np.where(medial, self.notch_v["M"], self.notch_v["L"])
        cut = np.where(medial, self.cut_v["M"], self.cut_v["L"])
        out = np.where(medial, REGIONS.index("pMF"), REGIONS.index("pLF"))
        out = np.where(v >= cut, np.where(medial, REGIONS.index("cMF"), REGIONS.index("cLF")), out)
        return np.where(v > notch, REGIONS.index("TrF"), out)

    def thirds(self, uva: np.ndarray, regions: np.ndarray) -> np.ndarray:
        """The third of c?F each point of ``regions`` (its :meth:`assign`) lies in, -1 outside c?F.
        u grows medially: the medial condyle's external third is its highest u, the lateral's its lowest."""
        out = np.full(len(uva), -1, dtype=np.int64)
        for side, order in (("M", "ice"), ("L", "eci")):
            mine = regions == REGIONS.index(f"c{side}F")
            if side not in self.third_cuts or not mine.any():
                continue
            which = np.searchsorted(np.asarray(self.third_cuts[side]), uva[mine, 0], side="right")
            out[mine] = np.array([REGIONS.index(f"{t}c{side}F") for t in order])[which]
        return out


def _stats(values: dict, tmap: ThicknessMap, names, region: np.ndarray | None = None) -> None:
    """Denuded share of each region's area; thickness over its covered area (area-weighted mean)
    without the plate's one-pixel rim, where the surface turns to the bone and a pixel sees the
    edge, not the plate (the whole covered area when a region is all rim). ``region``: another
    division of the map's plate than its own (the central femur's thirds)."""
    thickness, area = tmap.thickness, tmap.area_mm2
    inner = ndimage.binary_erosion(tmap.region >= 0)
    region = tmap.region if region is None else region
    for name in names:
        mine = region == REGIONS.index(name)
        if not mine.any():
            continue
        values[f"{name}_denuded_area_pct"] = 100.0 * float(area[mine & (thickness == 0)].sum() / area[mine].sum())
        covered = mine & (thickness > 0)
        use = covered & inner if (covered & inner).any() else covered
        if use.any():
            values[f"{name}_thickness_mean_mm"] = float(np.average(thickness[use], weights=area[use]))
            values[f"{name}_thickness_p95_mm"] = float(np.percentile(thickness[use], 95))
            values[f"{name}_thickness_min_mm"] = float(thickness[use].min())


def _volumes(values: dict, regions: np.ndarray, voxel_mm3: float) -> None:
    counts = np.bincount(regions, minlength=len(REGIONS))
    for i, name in enumerate(REGIONS):
        if counts[i]:
            values[f"{name}_volume_mm3"] = float(counts[i] * voxel_mm3)
            values[f"{name}_volume_ml"] = float(counts[i] * voxel_mm3 / 1000.0)


def regional_cartilage(labels: np.ndarray, grid: Grid, knee_side: str | None = None) -> RegionalResult:
    """Per-subregion thickness (mean, p95, min over the covered area), denuded area and volume of
    one label map on the host (NumPy; a crop about the knee is enough), and the two thickness
    maps. Regions whose plate is absent keep NaN thickness and 0 volume."""
    values, maps = empty_values(), {}
    centroids = {}
    for short, plate in PLATES.items():
        idx = np.argwhere(labels == L.by_name(plate).id)
        centroids[short] = grid.index_to_world(idx.mean(axis=0)) if len(idx) else None
    axes = frame(centroids, knee_side)
    if axes is None:
        return RegionalResult(values, maps)
    tibial_rules = _tibia(labels, grid, axes, centroids, values, maps)
    _femur(labels, grid, axes, centroids, tibial_rules, values, maps)
    return RegionalResult(values, maps)


def _tibia(labels, grid, axes: Frame, centroids, values, maps) -> dict:
    pixel = _pixel_sizes(grid, [axes.medial, axes.anterior])
    samples = {short: _surface_samples(labels, grid, plate) for short, plate in PLATES.items()}
    present = [s for s in PLATES if len(samples[s][1])]
    if not present:
        return {}
    uv_all = np.concatenate([axes.coords(samples[s][0])[:, :2] for s in present])
    lo, shape = _grid_for(uv_all, pixel)
    plate_tags = np.concatenate([np.full(len(samples[s][1]), n) for n, s in enumerate(present)])
    thick = np.concatenate([samples[s][1] for s in present])
    picked = _rasterise(uv_all, thick, pixel, lo, shape)
    thickness, plate_of = _gather(thick, picked, np.nan), _gather(plate_tags, picked, -1)
    _fill(thickness, plate_of, [[n] for n in range(len(present))], pixel[0] * pixel[1])
    centres = _pixel_centres(lo, shape, pixel)
    region = np.full(shape, -1, dtype=np.int64)
    rules = {}
    for n, short in enumerate(present):
        on = (plate_of == n).ravel()
        if not on.any():  # a few stray voxels that the other plate's pixels cover: no area of its own
            continue
        other = centroids["LT" if short == "MT" else "MT"]
        other_u = None if other is None else float(axes.coords(other[None])[0, 0])
        rules[short] = _TibialRule(short, centres[on], pixel[0] * pixel[1], other_u)
        region.ravel()[on] = rules[short].assign(centres[on])
        idx = np.argwhere(labels == L.by_name(PLATES[short]).id)
        _volumes(values, rules[short].assign(axes.coords(grid.index_to_world(idx))[:, :2]), grid.voxel_volume_mm3)
    maps["tibia"] = ThicknessMap(thickness, region, np.full(shape, pixel[0] * pixel[1]),
                                 ("medial (mm)", "anterior (mm)"), tuple(pixel))
    _stats(values, maps["tibia"], TIBIAL_REGIONS)
    return rules


def _femur(labels, grid, axes: Frame, centroids, tibial_rules, values, maps) -> None:
    points, thick = _surface_samples(labels, grid, FEMORAL)
    idx = np.argwhere(labels == L.by_name(FEMORAL).id)
    if not len(thick) or not tibial_rules:
        return
    every = axes.coords(grid.index_to_world(idx))
    if len(tibial_rules) == 2:
        split_u = float(np.mean([r.centre[0] for r in tibial_rules.values()]))
    else:
        split_u = float(np.median(every[:, 0]))
    notch_v, posterior_v = {}, {}
    for side, short in (("M", "MT"), ("L", "LT")):
        rule = tibial_rules.get(short) or next(iter(tibial_rules.values()))
        notch_v[side] = float(rule.high[1])  # the plate's anterior edge
        on_side = every[(every[:, 0] >= split_u) == (side == "M")]
        posterior_v[side] = float(np.percentile(on_side[:, 1], EDGE_PERCENTILE)) if len(on_side) else notch_v[side]
    rule = _FemoralRule(split_u, notch_v, posterior_v, every)
    regions = rule.voxel_regions
    thirds = rule.thirds(every, regions)
    _volumes(values, regions, grid.voxel_volume_mm3)
    _volumes(values, thirds[thirds >= 0], grid.voxel_volume_mm3)

    uvs = axes.coords(points)
    centre = every[:, 1:].mean(axis=0)  # inside the condyles: the cartilage wraps around them
    rel = uvs[:, 1:] - centre
    # the angle step spans a pixel's arc where the surface is nearest the axis (the notch), so
    # no angle step falls between two samples there
    radius = float(np.percentile(np.hypot(rel[:, 0], rel[:, 1]), NEAR_AXIS_PERCENTILE))
    # angle from superior through anterior (90), distal (180) to posterior (270): the seam is
    # above the condyles, where no femoral cartilage is
    angle = np.degrees(np.arctan2(rel[:, 0], rel[:, 1])) % 360.0
    pu, arc = _pixel_sizes(grid, [axes.medial, axes.anterior])[0], max(_pixel_sizes(grid, [axes.anterior, axes.superior]))
    pixel = (pu, math.degrees(arc / max(radius, 1.0)))
    ua = np.stack([uvs[:, 0], angle], axis=1)
    lo, shape = _grid_for(ua, pixel)
    picked = _rasterise(ua, thick, pixel, lo, shape)
    thickness, region = _gather(thick, picked, np.nan), _gather(rule.assign(uvs), picked, -1)
    # a pixel's area on the bone: its width times the arc its angle spans at its sample's radius
    area = pu * np.radians(pixel[1]) * _gather(np.hypot(rel[:, 0], rel[:, 1]) - thick, picked, 0.0)
    _fill(thickness, region, [[REGIONS.index(r) for r in FEMORAL_REGIONS]], pu * arc, area)
    # the thirds by each pixel's own medio-lateral position (a filled hole straddling a cut is split there)
    centres = _pixel_centres(lo, shape, pixel)
    third = rule.thirds(centres, region.ravel()).reshape(shape)
    maps["femur"] = ThicknessMap(thickness, region, area, ("medial (mm)", "angle (deg)"), pixel, third)
    _stats(values, maps["femur"], FEMORAL_REGIONS)
    _stats(values, maps["femur"], THIRDS, region=third)
