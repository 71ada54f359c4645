"""OA cartilage subregions on synthetic knees whose plates have a known thickness and defects
at known places (kneebatch.synth's anatomy, painted on grids of several orientations)."""

import numpy as np
import pytest

from kneebatch import labels as L
from kneebatch.cartilage_regions import FEMORAL_REGIONS, REGIONS, THIRDS, TIBIAL_REGIONS, regional_cartilage
from kneebatch.geometry import Grid
from kneebatch.synth.anatomy import Anatomy
from kneebatch.synth.render import Pose, render_labels

SAGITTAL = np.array([[-1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]]).T  # z -> R, y -> I, x -> P


def _rotation(axis, deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.radians(deg)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def knee(anatomy=None, side="RIGHT", direction=SAGITTAL, spacing=(1.0, 0.5, 0.5)):
    """A knee's label map on a grid of ``direction`` and ``spacing``, centred on the joint."""
    pose = Pose(np.eye(3), np.ones(3), np.zeros(3), side)
    extent = np.array([80.0, 80.0, 90.0])  # mm along the grid axes
    shape = tuple(int(n) for n in np.ceil(extent / np.asarray(spacing)))
    centre = np.array([0.0, 5.0, 15.0])
    origin = centre - direction @ ((np.array(shape) - 1) / 2 * np.asarray(spacing))
    grid = Grid.from_parts(shape, spacing, origin, direction)
    labels, _ = render_labels(anatomy or Anatomy(), pose, grid, spacing[0], 1)
    return labels[0], grid


def plate_volume(labels, grid, name):
    return float(np.sum(labels == L.by_name(name).id) * grid.voxel_volume_mm3)


@pytest.mark.parametrize("side, direction, spacing", [
    ("RIGHT", SAGITTAL, (1.0, 0.5, 0.5)),
    ("LEFT", SAGITTAL, (1.0, 0.5, 0.5)),
    ("RIGHT", _rotation((1, 1, 0), 12) @ SAGITTAL, (0.8, 0.4, 0.4)),  # oblique, finer
])
def test_regions_of_a_knee_with_known_thickness(side, direction, spacing):
    a = Anatomy()  # femur 2.3 mm, medial tibia 2.0 mm, lateral tibia 2.6 mm
    labels, grid = knee(a, side, direction, spacing)
    values = regional_cartilage(labels, grid).values
    truth = {"MT": a.cart_medial_tibial_mm, "LT": a.cart_lateral_tibial_mm}
    for region in TIBIAL_REGIONS:
        assert abs(values[f"{region}_thickness_mean_mm"] - truth[region[1:]]) < 0.2, region
    for region in FEMORAL_REGIONS:
        assert abs(values[f"{region}_thickness_mean_mm"] - a.cart_femoral_mm) < 0.25, region
    for region in THIRDS:  # the outer thirds reach up the condyles' steep sides: a voxel surface there reads less
        assert abs(values[f"{region}_thickness_mean_mm"] - a.cart_femoral_mm) < 0.3, region
    for region in REGIONS:
        assert values[f"{region}_denuded_area_pct"] == 0.0, region
        assert values[f"{region}_thickness_min_mm"] <= values[f"{region}_thickness_mean_mm"] \
            <= values[f"{region}_thickness_p95_mm"]
    # every voxel of a plate is in one of its regions
    for plate, regions in (("medial_tibial_cartilage", [r for r in TIBIAL_REGIONS if r.endswith("MT")]),
                           ("lateral_tibial_cartilage", [r for r in TIBIAL_REGIONS if r.endswith("LT")]),
                           ("femoral_cartilage", FEMORAL_REGIONS)):
        total = sum(values[f"{r}_volume_mm3"] for r in regions)
        assert total == pytest.approx(plate_volume(labels, grid, plate), rel=1e-12)
        assert all(values[f"{r}_volume_mm3"] > 0 for r in regions)
    # the central tibial ellipse covers 20 % of the plate; a region's volume follows its area
    for plate in ("MT", "LT"):
        share = values[f"c{plate}_volume_mm3"] / sum(values[f"{r}{plate}_volume_mm3"] for r in "capei")
        assert 0.17 < share < 0.23, (plate, share)
    # the weight-bearing femur (notch to 60 %) is larger than the posterior condyle beyond it
    assert values["cMF_volume_mm3"] > values["pMF_volume_mm3"] > 0
    # its thirds add up to it; they are of equal width, and the condyle's cartilage curves up
    # its sides, so the middle third lies flattest and holds least
    for condyle in "ML":
        parts = [values[f"{t}c{condyle}F_volume_mm3"] for t in "eci"]
        assert sum(parts) == pytest.approx(values[f"c{condyle}F_volume_mm3"], rel=1e-12)
        assert all(0.15 < p / sum(parts) < 0.55 for p in parts) and parts[1] == min(parts), (condyle, parts)


# canonical knee mm: x medial, y posterior, z superior (kneebatch.synth.anatomy)
DEFECTS = {
    "aMT": (19.0, -9.0, -1.5, 3.5),  # medial plate's centre (19, 4), radii (15, 19)
    "eMT": (29.5, 4.0, -1.5, 3.0),
    "pLT": (-19.0, 16.0, -1.5, 3.0),  # lateral plate's centre (-19, 4), radii (14, 18)
    "pMF": (20.0, 33.5, 21.0, 4.0),  # the medial condyle's posterior pole
    "TrF": (10.0, -24.0, 40.0, 4.0),  # the trochlea
}


@pytest.mark.parametrize("side", ["RIGHT", "LEFT"])
def test_denuded_bone_is_found_in_the_region_it_lies_in_and_nowhere_else(side):
    labels, grid = knee(Anatomy(cart_defects=list(DEFECTS.values())), side)
    values = regional_cartilage(labels, grid).values
    for region in REGIONS:
        pct = values[f"{region}_denuded_area_pct"]
        if region in DEFECTS:
            # the femur's regions are large (the trochlea ~2,300 mm2): a 40 mm2 hole is a few %
            assert (0.3 if region.endswith("F") else 4.0) < pct < 60.0, (region, pct)
        else:
            assert pct == 0.0, (region, pct)
    # a full-thickness hole of radius ~2.8 mm in the medial plate's anterior region: its area
    # over the region's (the map's pixels), within a pixel ring of the disc's
    x, y, z, r = DEFECTS["aMT"]
    hole_mm2 = np.pi * (r ** 2 - 1.0 ** 2)  # the plate is 2 mm thick about z = -1.5
    plate_mm2 = np.pi * 15.0 * 19.0
    region_mm2 = plate_mm2 * (1 - 0.2) / 4  # about a quarter of the non-central area
    assert values["aMT_denuded_area_pct"] == pytest.approx(100 * hole_mm2 / region_mm2, rel=0.5)


def test_maps_are_the_plates_seen_from_above_and_unrolled():
    labels, grid = knee()
    result = regional_cartilage(labels, grid)
    tibia, femur = result.maps["tibia"], result.maps["femur"]
    covered = np.isfinite(tibia.thickness)
    area = covered.sum() * tibia.pixel[0] * tibia.pixel[1]
    plates_mm2 = np.pi * (15.0 * 19.0 + 14.0 * 18.0)  # the two elliptical plates
    assert area == pytest.approx(plates_mm2, rel=0.12)
    assert set(np.unique(tibia.region[covered])) == {REGIONS.index(r) for r in TIBIAL_REGIONS}
    assert set(np.unique(femur.region[femur.region >= 0])) == {REGIONS.index(r) for r in FEMORAL_REGIONS}
    assert np.nanmedian(femur.thickness) == pytest.approx(2.3, abs=0.25)
    # the weight-bearing femur's thirds: equal widths side by side, internal towards the notch
    u = np.arange(femur.region.shape[0])[:, None] * np.ones(femur.region.shape[1])
    for condyle, outward in (("M", 1), ("L", -1)):
        width = {t: np.ptp(u[femur.thirds == REGIONS.index(f"{t}c{condyle}F")]) for t in "eci"}
        whole = np.ptp(u[femur.region == REGIONS.index(f"c{condyle}F")])
        assert width["c"] == pytest.approx(whole / 3, abs=2), (condyle, width, whole)
        middle = {t: outward * u[femur.thirds == REGIONS.index(f"{t}c{condyle}F")].mean() for t in "eci"}
        assert middle["i"] < middle["c"] < middle["e"], (condyle, middle)


def test_without_tibial_plates_or_a_knee_side_there_are_no_regions():
    labels, grid = knee()
    labels[np.isin(labels, L.ids("medial_tibial_cartilage", "lateral_tibial_cartilage"))] = 0
    values = regional_cartilage(labels, grid).values
    assert all(np.isnan(values[f"{r}_thickness_mean_mm"]) for r in REGIONS)
    assert all(values[f"{r}_volume_mm3"] == 0 for r in REGIONS)


def test_one_plate_and_the_knee_side_still_give_that_plates_regions():
    labels, grid = knee()
    labels[labels == L.by_name("lateral_tibial_cartilage").id] = 0
    values = regional_cartilage(labels, grid, knee_side="right").values
    for region in TIBIAL_REGIONS:
        if region.endswith("MT"):
            assert abs(values[f"{region}_thickness_mean_mm"] - 2.0) < 0.2, region
        else:
            assert np.isnan(values[f"{region}_thickness_mean_mm"]) and values[f"{region}_volume_mm3"] == 0
    assert values["cMF_volume_mm3"] > 0 and values["cLF_volume_mm3"] > 0


def test_group_comparisons_take_the_weight_bearing_regions_by_default():
    import pandas as pd

    from kneebatch.stats import default_measures

    df = pd.DataFrame({c: [1.0, 2.0] for c in ("femoral_cartilage_thickness_mean_mm", "effusion_volume_ml",
                                                "cMF_thickness_mean_mm", "cLT_thickness_mean_mm",
                                                "aMT_thickness_mean_mm", "cMF_volume_ml", "TrF_thickness_mean_mm")})
    assert default_measures(df) == ["femoral_cartilage_thickness_mean_mm", "effusion_volume_ml",
                                    "cMF_thickness_mean_mm", "cLT_thickness_mean_mm"]


@pytest.mark.parametrize("side", ["RIGHT", "LEFT"])
def test_central_femur_thirds_are_external_central_internal(side):
    """Defects in the weight-bearing region on the outer side of each condyle and in the middle
    of the medial one: each in its third and nowhere else (a mix-up of medial and lateral, or of
    external and internal, would put the outer ones in the internal thirds)."""
    # canonical mm: the medial condyle spans x 6-34, the lateral -34 to -6; their cartilage faces
    # the tibia about y 4, its lowest 0.75 mm above the joint line at x = 20, 2 mm at 26 (where the
    # surface still faces the tibia enough for the unrolled map to see a hole)
    defects = {"ecMF": (27.0, 4.0, 3.6, 3.0), "ccMF": (20.0, 4.0, 1.5, 2.5), "ecLF": (-26.0, 4.0, 3.1, 3.0)}
    labels, grid = knee(Anatomy(cart_defects=list(defects.values())), side)
    values = regional_cartilage(labels, grid).values
    for region in THIRDS:
        pct = values[f"{region}_denuded_area_pct"]
        if region in defects:
            assert 1.0 < pct < 10.0, (region, pct)
        else:
            assert pct == 0.0, (region, pct)
    assert values["cMF_denuded_area_pct"] > values["cLF_denuded_area_pct"] > 0.5
    assert all(values[f"{r}_denuded_area_pct"] == 0.0 for r in TIBIAL_REGIONS + ("TrF", "pMF", "pLF"))
