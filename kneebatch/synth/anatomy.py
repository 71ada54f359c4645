"""A parametric right-knee phantom in a canonical frame, as implicit shapes.

Canonical frame (mm): origin on the joint line between the femoral condyles,
``x`` towards medial, ``y`` towards posterior, ``z`` towards superior. A subject's
pose, size and side are applied by :mod:`kneebatch.synth.render`, which evaluates
these shapes at voxel positions.

Each :class:`Structure` paints one label (or an internal render class) inside a
canonical bounding box; structures are painted in list order, later ones win, which
keeps contacts (cartilage on bone, menisci on the plateau) free of overlaps.
Signed distances (negative inside) are approximate but good to a fraction of a mm
near surfaces, which is all the shells (cartilage, fat, cortex) need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from kneebatch import labels as L

# internal render classes beyond the schema; truth maps them to background
BODY = 255  # soft tissue/fat inside the skin that no label claims (Hoffa, popliteal fat)
AIR = 254  # paints background (outside the skin) over what was painted before


# ---------------------------------------------------------------- signed distances
def ellipsoid(x, y, z, c, r):
    """Approximate SDF of an ellipsoid (Quilez' bound, exact on the axes)."""
    px, py, pz = (x - c[0]) / r[0], (y - c[1]) / r[1], (z - c[2]) / r[2]
    k0 = np.sqrt(px * px + py * py + pz * pz)
    k1 = np.sqrt((px / r[0]) ** 2 + (py / r[1]) ** 2 + (pz / r[2]) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def capsule(x, y, z, a, b, r):
    a = np.asarray(a, np.float32)
    ba = np.asarray(b, np.float32) - a
    px, py, pz = x - a[0], y - a[1], z - a[2]
    h = np.clip((px * ba[0] + py * ba[1] + pz * ba[2]) / float(ba @ ba), 0.0, 1.0)
    dx, dy, dz = px - ba[0] * h, py - ba[1] * h, pz - ba[2] * h
    return np.sqrt(dx * dx + dy * dy + dz * dz) - r


def elliptic_cylinder(x, y, z, c, r, z0, z1):
    """Vertical elliptic cylinder between heights z0 < z1."""
    px, py = (x - c[0]) / r[0], (y - c[1]) / r[1]
    d2 = (np.sqrt(px * px + py * py) - 1.0) * min(r)
    dz = np.maximum(z0 - z, z - z1)
    return np.maximum(d2, dz)


def smooth_union(a, b, k):
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def union(*sdfs):
    out = sdfs[0]
    for s in sdfs[1:]:
        out = np.minimum(out, s)
    return out


def ellipse_radius(x, y, c, r):
    return np.sqrt(((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2)


# ---------------------------------------------------------------- subject anatomy
@dataclass
class Anatomy:
    """Per-subject shape parameters in canonical mm (drawn by :mod:`.cohort`)."""

    cart_femoral_mm: float = 2.3
    cart_medial_tibial_mm: float = 2.0
    cart_lateral_tibial_mm: float = 2.6
    cart_patellar_mm: float = 3.0
    cart_defects: list = field(default_factory=list)  # [(x, y, z, radius)]
    effusion_scale: float = 1.0  # suprapatellar pouch thickness factor
    osteophytes: list = field(default_factory=list)  # [(x, y, z, radius)]
    fat_mm: float = 8.0
    thigh_radii: tuple = (62.0, 56.0)
    calf_radii: tuple = (52.0, 48.0)
    muscle_scale: float = 1.0
    meniscus_height_mm: float = 6.5
    cortex_mm: float = 1.2
    # pose of the joint and shape variants (0: the typical knee); drawn by cohort.draw_variation
    flexion_deg: float = 0.0  # the lower leg swings posteriorly about the condyles' axis
    varus_deg: float = 0.0  # + varus, - valgus: the lower leg tilts about the antero-posterior axis
    patella_height_mm: float = 0.0  # + alta, - baja
    patella_tilt_deg: float = 0.0  # lateral tilt about the long axis
    meniscus_extrusion_mm: float = 0.0  # the medial meniscus pushed out of the joint
    meniscus_tear_deg: float | None = None  # a radial tear of the medial meniscus at this angle (fluid fills it)
    popliteal_cyst_mm: float = 0.0  # radius of a Baker's cyst between the medial gastrocnemius and semimembranosus
    fibula_shift_mm: tuple = (0.0, 0.0, 0.0)
    condyle_scale: tuple = (1.0, 1.0)  # medial, lateral femoral condyle size
    plateau_scale: float = 1.0

    def lower_leg(self) -> JointTransform:
        return JointTransform(self.flexion_deg, self.varus_deg)


@dataclass(frozen=True)
class JointTransform:
    """The tibia's frame relative to the femur's: flexion about the mediolateral axis through
    the condyles' centre, varus/valgus about the antero-posterior axis through the joint centre.
    Structures of the lower leg are drawn in the tibia's frame: a point ``q`` of the femur's
    frame is at :meth:`to_tibia` (q) there."""

    flexion_deg: float = 0.0
    varus_deg: float = 0.0
    FLEXION_PIVOT = (0.0, 6.0, 22.0)
    VARUS_PIVOT = (0.0, 4.0, 0.0)

    @property
    def identity(self) -> bool:
        return self.flexion_deg == 0.0 and self.varus_deg == 0.0

    def _matrices(self):
        f, v = np.radians(self.flexion_deg), np.radians(self.varus_deg)
        rx = np.array([[1, 0, 0], [0, np.cos(f), -np.sin(f)], [0, np.sin(f), np.cos(f)]])
        ry = np.array([[np.cos(v), 0, np.sin(v)], [0, 1, 0], [-np.sin(v), 0, np.cos(v)]])
        return rx, ry

    def to_femur(self, p):
        """A point of the tibia's frame in the femur's (for ligament insertions)."""
        p = np.asarray(p, float)
        if self.identity:
            return tuple(p)
        rx, ry = self._matrices()
        fp, vp = np.array(self.FLEXION_PIVOT), np.array(self.VARUS_PIVOT)
        q = ry @ (p - vp) + vp
        return tuple(rx @ (q - fp) + fp)

    def to_tibia(self, x, y, z):
        if self.identity:
            return x, y, z
        rx, ry = self._matrices()
        fp, vp = self.FLEXION_PIVOT, self.VARUS_PIVOT
        cx, cy, cz = x - fp[0], y - fp[1], z - fp[2]
        # inverse flexion (rx transposed), then inverse varus
        qx = rx[0, 0] * cx + rx[1, 0] * cy + rx[2, 0] * cz + fp[0]
        qy = rx[0, 1] * cx + rx[1, 1] * cy + rx[2, 1] * cz + fp[1]
        qz = rx[0, 2] * cx + rx[1, 2] * cy + rx[2, 2] * cz + fp[2]
        cx, cy, cz = qx - vp[0], qy - vp[1], qz - vp[2]
        return (ry[0, 0] * cx + ry[1, 0] * cy + ry[2, 0] * cz + vp[0],
                ry[0, 1] * cx + ry[1, 1] * cy + ry[2, 1] * cz + vp[1],
                ry[0, 2] * cx + ry[1, 2] * cy + ry[2, 2] * cz + vp[2])

    def box(self, box):
        """The femur-frame box holding a tibia-frame ``box``."""
        if self.identity:
            return box
        lo, hi = box
        corners = np.array([self.to_femur((a, b, c)) for a in (lo[0], hi[0]) for b in (lo[1], hi[1])
                            for c in (lo[2], hi[2])])
        return tuple(corners.min(0) - 1.0), tuple(corners.max(0) + 1.0)


def in_tibia_frame(fn, a: Anatomy):
    """``fn(x, y, z, ...)`` of the tibia's frame, evaluated at femur-frame points."""
    t = a.lower_leg()
    if t.identity:
        return fn

    def moved(x, y, z, *args, **kw):
        return fn(*t.to_tibia(x, y, z), *args, **kw)

    return moved


@dataclass
class Structure:
    """``paint(x, y, z)`` returns a bool mask (paint ``label`` there) or, for layered
    structures, a uint8 array of labels (0 = leave as is, :data:`AIR` = background).
    Bones give a signed distance instead (``sdf=True``): inside and cortex from one call."""

    label: int
    bbox: tuple  # ((xmin, ymin, zmin), (xmax, ymax, zmax)) canonical mm
    paint: Callable
    sdf: bool = False


def femur_sdf(x, y, z, a: Anatomy):
    shaft = capsule(x, y, z, (0, 2, 40), (0, -2, 320), 15.0)
    meta = ellipsoid(x, y, z, (0, 0, 40), (36, 24, 28))
    m, l_ = a.condyle_scale
    med = ellipsoid(x, y, z, (20, 6, 22.5), (14 * m, 26 * m, 20 * m))
    lat = ellipsoid(x, y, z, (-20, 6, 22.0), (14 * l_, 24 * l_, 19.5 * l_))
    d = smooth_union(smooth_union(shaft, meta, 8.0), np.minimum(med, lat), 5.0)
    return _with_osteophytes(d, x, y, z, a, zmin=0.0)


def tibia_sdf(x, y, z, a: Anatomy):
    """In the tibia's frame (see :func:`in_tibia_frame`)."""
    plateau = elliptic_cylinder(x, y, z, (0, 4), (38 * a.plateau_scale, 26 * a.plateau_scale), -28.0, -2.5)
    shaft = capsule(x, y, z, (0, 6, -22), (0, 9, -320), 16.0)
    spines = np.minimum(
        ellipsoid(x, y, z, (5, 4, -2.5), (3.5, 5, 4)), ellipsoid(x, y, z, (-5, 4, -2.5), (3.5, 5, 3.5))
    )
    tuberosity = ellipsoid(x, y, z, (0, -20, -30), (10, 6, 12))
    d = smooth_union(plateau, shaft, 10.0)
    d = np.minimum(np.minimum(d, spines), smooth_union(d, tuberosity, 4.0))
    return _with_osteophytes(d, x, y, z, a, zmax=0.0)


def fibula_sdf(x, y, z, a: Anatomy):
    """In the tibia's frame."""
    dx, dy, dz = a.fibula_shift_mm
    head = ellipsoid(x, y, z, (-31 + dx, 16 + dy, -26 + dz), (9, 9, 10))
    shaft = capsule(x, y, z, (-31 + dx, 16 + dy, -28 + dz), (-29 + dx, 20 + dy, -320), 7.0)
    return smooth_union(head, shaft, 4.0)


PATELLA_CENTRE = (0.0, -38.0, 38.0)


def _patella_frame(x, y, z, a: Anatomy):
    """Points in the frame of a typical patella: moved up by the patella height, untilted."""
    cx, cy, cz = PATELLA_CENTRE
    z = z - a.patella_height_mm
    if a.patella_tilt_deg:
        t = np.radians(a.patella_tilt_deg)
        px, py = x - cx, y - cy
        x, y = cx + np.cos(t) * px + np.sin(t) * py, cy - np.sin(t) * px + np.cos(t) * py
    return x, y, z


def patella_sdf(x, y, z, a: Anatomy):
    x, y, z = _patella_frame(x, y, z, a)
    return ellipsoid(x, y, z, PATELLA_CENTRE, (21, 8, 17))


def _with_osteophytes(d, x, y, z, a: Anatomy, zmin=-np.inf, zmax=np.inf):
    for ox, oy, oz, r in a.osteophytes:
        if zmin <= oz <= zmax:
            d = smooth_union(d, ellipsoid(x, y, z, (ox, oy, oz), (r, r, r)), 1.5)
    return d


def _limb_sdf(x, y, z, a: Anatomy):
    t = np.clip((z + 40.0) / 80.0, 0.0, 1.0)  # 0 in the calf, 1 in the thigh
    rx = a.calf_radii[0] + t * (a.thigh_radii[0] - a.calf_radii[0])
    ry = a.calf_radii[1] + t * (a.thigh_radii[1] - a.calf_radii[1])
    return (np.sqrt((x / rx) ** 2 + ((y - 5.0) / ry) ** 2) - 1.0) * np.minimum(rx, ry)


def skin_sdf(x, y, z, a: Anatomy):
    """Elliptic limb cross-section narrowing from thigh to calf across the joint; a bent knee's
    calf follows the tibia."""
    t = a.lower_leg()
    if t.identity:
        return _limb_sdf(x, y, z, a)
    tx, ty, tz = t.to_tibia(x, y, z)
    thigh = np.where(z > -10.0, _limb_sdf(x, y, np.maximum(z, 0.0), a), np.inf)
    calf = np.where(tz < 10.0, _limb_sdf(tx, ty, np.minimum(tz, 0.0), a), np.inf)
    return np.minimum(thigh, calf)


def _shell(sdf, thickness):
    return (sdf > 0) & (sdf < thickness)


def _not_in_defect(x, y, z, a: Anatomy):
    keep = np.ones(x.shape, bool)
    for cx, cy, cz, r in a.cart_defects:
        keep &= (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 > r * r
    return keep


def _meniscus(x, y, z, a: Anatomy, cx, radii, open_halfwidth_deg, extrusion=0.0, tear_deg=None):
    """In the tibia's frame. ``extrusion`` (mm) pushes it outwards; ``tear_deg``: a radial gap there."""
    cx = cx + np.sign(cx) * extrusion
    u = ellipse_radius(x, y, (cx, 4.0), radii)
    u_in = 0.55
    h = a.meniscus_height_mm * np.clip((u - u_in) / (1.0 - u_in), 0.0, 1.0)
    wedge = (u > u_in) & (u < 1.0) & (z > -2.5) & (z < -2.5 + h)
    # the C opens towards the intercondylar area (towards x = 0)
    angle = np.degrees(np.arctan2(y - 4.0, (x - cx) * -np.sign(cx)))
    out = wedge & (np.abs(angle) > open_halfwidth_deg)
    if tear_deg is not None:
        out &= np.abs(angle - tear_deg) > 6.0
    return out


def structures(a: Anatomy) -> list[Structure]:
    """Paint list, lowest priority first: soft tissue and skin, effusion, ligaments and tendon,
    menisci, cartilage, bones."""
    return [*_soft_tissue(a), _effusion(a), *_ligaments(a), *_menisci(a), *_cartilage(a), *_bones(a)]


BIG = (-90.0, -80.0, -400.0), (90.0, 90.0, 400.0)  # every structure that fills the body
THIGH = (-75.0, -70.0, -45.0), (75.0, 80.0, 400.0)


def _up(a: Anatomy, box, pad=0.0):
    """A box that moves with the patella (padded when the patella is tilted)."""
    (x0, y0, z0), (x1, y1, z1) = box
    lift = a.patella_height_mm
    return (x0 - pad, y0 - pad, z0 + lift - pad), (x1 + pad, y1 + pad, z1 + lift + pad)


def _patella_pad(a: Anatomy) -> float:
    return 4.0 if a.patella_tilt_deg else 0.0


def _span(*ends, pad=6.0):
    """The box around a structure's ends."""
    pts = np.array([np.asarray(e, float) for e in ends])
    return tuple(pts.min(0) - pad), tuple(pts.max(0) + pad)


def _soft_tissue(a: Anatomy) -> list[Structure]:
    """The body, the muscles, and the skin's layers (painted after the muscles)."""
    lab = L.by_name
    leg = a.lower_leg()
    ms = a.muscle_scale
    subcut_id = lab("subcutaneous_fat").id

    def body(x, y, z):
        return np.ones(x.shape, bool)

    def skin_layers(x, y, z):
        """Subcutaneous fat under the skin, air outside it."""
        s = skin_sdf(x, y, z, a)
        return np.where(s >= 0, np.uint8(AIR), np.where(s > -a.fat_mm, np.uint8(subcut_id), np.uint8(0)))

    def quadriceps(x, y, z):
        return (ellipsoid(x, y, z, (0, -20, 125), (50 * ms, 24 * ms, 80)) < 0) & (z > 48)

    def hamstrings(x, y, z):
        m = np.minimum(
            ellipsoid(x, y, z, (22, 32, 115), (22 * ms, 20 * ms, 80)),
            ellipsoid(x, y, z, (-22, 32, 110), (21 * ms, 19 * ms, 80)),
        )
        return (m < 0) & (z > 30)

    @partial(in_tibia_frame, a=a)  # lower-leg structures are drawn in the tibia's frame
    def gastrocnemius(x, y, z):
        m = np.minimum(
            ellipsoid(x, y, z, (17, 34, -60), (19 * ms, 19 * ms, 72)),
            ellipsoid(x, y, z, (-17, 34, -62), (18 * ms, 18 * ms, 70)),
        )
        return (m < 0) & (z < 24)

    calf = leg.box(((-70.0, -60.0, -400.0), (70.0, 75.0, 40.0)))
    return [
        Structure(BODY, BIG, body),
        Structure(lab("quadriceps_muscle").id, THIGH, quadriceps),
        Structure(lab("hamstring_muscle").id, THIGH, hamstrings),
        Structure(lab("gastrocnemius_muscle").id, calf, gastrocnemius),
        Structure(subcut_id, BIG, skin_layers),
    ]


def _effusion(a: Anatomy) -> Structure:
    """The suprapatellar pouch, the posterior recess and the joint line; a Baker's cyst and the
    fluid in a meniscal tear when the subject has them."""
    leg = a.lower_leg()
    lift = a.patella_height_mm

    def effusion(x, y, z):
        e = a.effusion_scale
        pouch = ellipsoid(x, y, z, (0, -28, 62 + 0.5 * lift), (28, 1.2 * e, 18 + 2 * e)) < 0
        posterior = ellipsoid(x, y, z, (-14, 30, 18), (8, 1.0 * e, 10)) < 0
        joint = (ellipse_radius(x, y, (0, 4), (36, 25)) < 1.0) & (z > -0.8) & (z < 0.8)
        out = pouch | posterior | joint
        if a.popliteal_cyst_mm > 0:  # Baker's cyst: behind the medial femoral condyle
            r = a.popliteal_cyst_mm
            out |= ellipsoid(x, y, z, (16, 38, 8), (0.8 * r, r, 1.5 * r)) < 0
        if a.meniscus_tear_deg is not None:  # fluid in the tear
            tx, ty, tz = leg.to_tibia(x, y, z)
            whole = _meniscus(tx, ty, tz, a, 19.0, (16.5, 21.0), 38.0, a.meniscus_extrusion_mm)
            out |= whole & ~_meniscus(tx, ty, tz, a, 19.0, (16.5, 21.0), 38.0, a.meniscus_extrusion_mm,
                                      a.meniscus_tear_deg)
        return out

    joint = (-45.0, -35.0, -12.0), (45.0, 50.0, 70.0 + max(lift, 0.0))
    return Structure(L.by_name("effusion").id, joint, effusion)


def _ligaments(a: Anatomy) -> list[Structure]:
    """Cruciates, collaterals (the MCL in three bands) and the patellar tendon (five bands)."""
    lab = L.by_name
    leg = a.lower_leg()
    lift = a.patella_height_mm

    def ligament(femoral_end, tibial_end, radius):
        tibial_end = leg.to_femur(tibial_end)
        return lambda x, y, z: capsule(x, y, z, femoral_end, tibial_end, radius) < 0

    def bands(parts):
        return lambda x, y, z: np.logical_or.reduce([b(x, y, z) for b in parts])

    fibula_end = (-34 + a.fibula_shift_mm[0], 14 + a.fibula_shift_mm[1], -22)
    mcl = bands([ligament((38, 2 + o, 34), (39, 1 + o, -42), 1.6) for o in (-4, 0, 4)])
    tendon = bands([ligament((o, -38, 22 + lift), (o * 0.8, -26, -30), 2.2) for o in (-8, -4, 0, 4, 8)])
    return [
        Structure(lab("acl").id, _span((-8, 15, 12), leg.to_femur((-3, -6, -3))),
                  ligament((-8, 15, 12), (-3, -6, -3), 4.0)),
        Structure(lab("pcl").id, _span((8, 2, 12), leg.to_femur((0, 22, -6))), ligament((8, 2, 12), (0, 22, -6), 4.8)),
        Structure(lab("mcl").id, _span((38, -2, 34), (38, 6, 34), leg.to_femur((39, -3, -42)),
                                       leg.to_femur((39, 5, -42)), pad=4.0), mcl),
        Structure(lab("lcl").id, _span((-38, 6, 30), leg.to_femur(fibula_end)), ligament((-38, 6, 30), fibula_end, 2.6)),
        Structure(lab("patellar_tendon").id, _span((-8, -38, 22 + lift), (8, -38, 22 + lift),
                                                   leg.to_femur((-6.4, -26, -30)), leg.to_femur((6.4, -26, -30))),
                  tendon),
    ]


def _menisci(a: Anatomy) -> list[Structure]:
    leg = a.lower_leg()

    @partial(in_tibia_frame, a=a)
    def medial_meniscus(x, y, z):
        return _meniscus(x, y, z, a, 19.0, (16.5, 21.0), 38.0, a.meniscus_extrusion_mm, a.meniscus_tear_deg)

    @partial(in_tibia_frame, a=a)
    def lateral_meniscus(x, y, z):
        return _meniscus(x, y, z, a, -19.0, (15.0, 19.0), 22.0)

    return [
        Structure(L.by_name("medial_meniscus").id, leg.box(((0, -20, -3), (38 + a.meniscus_extrusion_mm + 2, 28, 6))),
                  medial_meniscus),
        Structure(L.by_name("lateral_meniscus").id, leg.box(((-36, -17, -3), (0, 25, 6))), lateral_meniscus),
    ]


def _cartilage(a: Anatomy) -> list[Structure]:
    """The femoral, medial and lateral tibial and patellar plates: shells of their bones, with the
    subject's defects cut out."""
    lab = L.by_name
    leg = a.lower_leg()

    def femoral_cartilage(x, y, z):
        region = (z < 52) & ((y < -8) | (z < 28)) & (np.abs(x) < 34)
        return _shell(femur_sdf(x, y, z, a), a.cart_femoral_mm) & region & _not_in_defect(x, y, z, a)

    def tibial_cartilage(cx, radii, thickness):
        @partial(in_tibia_frame, a=a)
        def inside(x, y, z):
            region = (z > -3.0) & (ellipse_radius(x, y, (cx, 4.0), radii) < 1.0)
            return _shell(tibia_sdf(x, y, z, a), thickness) & region & _not_in_defect(x, y, z, a)

        return inside

    def patellar_cartilage(x, y, z):
        px, py, pz = _patella_frame(x, y, z, a)
        return _shell(patella_sdf(x, y, z, a), a.cart_patellar_mm) & (py > -36) & _not_in_defect(px, py, pz, a)

    return [
        Structure(lab("femoral_cartilage").id, ((-36, -32, -2), (36, 40, 54)), femoral_cartilage),
        Structure(lab("medial_tibial_cartilage").id, leg.box(((2, -18, -4), (36, 26, 4))),
                  tibial_cartilage(19.0, (15.0, 19.0), a.cart_medial_tibial_mm)),
        Structure(lab("lateral_tibial_cartilage").id, leg.box(((-36, -16, -4), (-2, 24, 4))),
                  tibial_cartilage(-19.0, (14.0, 18.0), a.cart_lateral_tibial_mm)),
        Structure(lab("patellar_cartilage").id, _up(a, ((-24, -40, 18), (24, -25, 58)), _patella_pad(a)),
                  patellar_cartilage),
    ]


def _bones(a: Anatomy) -> list[Structure]:
    """Femur, tibia, fibula and patella as signed distances, their boxes grown over osteophytes."""
    leg = a.lower_leg()
    fx, fy, fz = a.fibula_shift_mm
    bones = (
        ("femur", femur_sdf, ((-45, -35, -2), (45, 45, 400)), False),
        ("tibia", tibia_sdf, ((-45, -35, -400), (45, 40, 3)), True),
        ("fibula", fibula_sdf, ((-42 + fx, 5 + fy, -400), (-18 + fx, 30 + fy, -14 + fz)), True),
        ("patella", patella_sdf, _up(a, ((-23, -48, 19), (23, -28, 57)), _patella_pad(a)), False),
    )
    out = []
    for name, fn, box, lower in bones:
        paint = partial(fn, a=a)
        if lower:
            paint, box = in_tibia_frame(paint, a), leg.box(box)
        out.append(Structure(L.by_name(name).id, _grow(box, a.osteophytes), paint, sdf=True))
    return out


def _grow(box, osteophytes, margin=6.0):
    lo, hi = np.array(box[0], float), np.array(box[1], float)
    for ox, oy, oz, r in osteophytes:
        p = np.array([ox, oy, oz])
        if np.all(p >= lo - 15) and np.all(p <= hi + 15):
            lo, hi = np.minimum(lo, p - r - margin), np.maximum(hi, p + r + margin)
    return tuple(lo), tuple(hi)
