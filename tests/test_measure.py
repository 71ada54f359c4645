import math

import array_api_strict as xps
import numpy as np
import pytest
import torch

from kneebatch import labels as L
from kneebatch import ops
from kneebatch.geometry import Grid
from kneebatch.measure import cartilage_thickness, measure_study, measurement_schema, volumes

RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, L.N_CLASSES, (6, 9, 11)).astype(np.uint8)
VALUES = RNG.random((6, 9, 11))


def _as(ns, arr):
    if ns == "numpy":
        return arr
    if ns == "torch":
        return torch.from_numpy(arr)
    return xps.asarray(arr)


@pytest.mark.parametrize("ns", ["numpy", "torch", "array_api_strict"])
def test_ops_agree_across_array_namespaces(ns):
    lab, val = _as(ns, LABELS), _as(ns, VALUES)
    counts = np.asarray(ops.to_numpy(ops.label_counts(lab, L.N_CLASSES)))
    assert np.array_equal(counts, np.bincount(LABELS.ravel(), minlength=L.N_CLASSES))
    sums = np.asarray(ops.to_numpy(ops.label_sums(lab, val, L.N_CLASSES)))
    assert np.allclose(sums, np.bincount(LABELS.ravel(), VALUES.ravel(), minlength=L.N_CLASSES))
    means = np.asarray(ops.to_numpy(ops.label_means(lab, val, L.N_CLASSES)))
    assert np.allclose(means, sums / counts)
    mask = np.zeros((6, 9, 11), bool)
    mask[2:4, 3:7, 5] = True
    box = ops.bounding_box(_as(ns, mask), margin=(1, 1, 1))
    assert box == (slice(1, 5), slice(2, 8), slice(4, 7))
    assert ops.bounding_box(_as(ns, np.zeros_like(mask))) is None
    surf = np.asarray(ops.to_numpy(ops.surface(_as(ns, mask), _as(ns, np.zeros_like(mask)))))
    assert surf.sum() == 8  # a 2x4x1 plate is all surface
    block = np.zeros((5, 5, 5), bool)
    block[1:4, 1:4, 1:4] = True
    surf = np.asarray(ops.to_numpy(ops.surface(_as(ns, block), _as(ns, np.zeros_like(block)))))
    assert surf.sum() == 26 and not surf[2, 2, 2]
    assert not bool(ops.touches_border(_as(ns, mask))) and not bool(ops.touches_border(_as(ns, block)))
    assert bool(ops.touches_border(_as(ns, np.ones_like(block))))


@pytest.mark.parametrize("ns", ["numpy", "torch", "array_api_strict"])
def test_distances_to_equal_the_distance_transform(ns):
    from scipy import ndimage

    rng = np.random.default_rng(7)
    smooth = ndimage.gaussian_filter(rng.random((14, 30, 26)), 2.5)
    bone = smooth > np.quantile(smooth, 0.7)  # blobs, with pockets and box-edge contact
    query = ~bone & (rng.random(bone.shape) < 0.3)
    spacing = (3.1, 0.45, 0.6)
    want = ndimage.distance_transform_edt(~bone, sampling=spacing)[query]
    got = np.asarray(ops.to_numpy(ops.distances_to(_as(ns, bone), _as(ns, query), spacing)))
    assert got.shape == want.shape and np.allclose(got, want, rtol=0, atol=1e-9)
    assert np.isinf(ops.to_numpy(ops.distances_to(_as(ns, np.zeros_like(bone)), _as(ns, query), spacing))).all()


def test_ops_absent_label_mean_is_nan():
    means = ops.label_means(np.zeros((3, 3, 3), np.uint8), np.ones((3, 3, 3)), 3)
    assert means[0] == 1.0 and math.isnan(means[1]) and math.isnan(means[2])


def _grid(shape, spacing):
    return Grid.from_parts(shape, spacing, (0, 0, 0), np.eye(3))


def test_volumes_are_counts_times_voxel_volume():
    grid = _grid(LABELS.shape, (3.3, 0.4, 0.35))
    v = volumes(LABELS, grid)
    counts = np.bincount(LABELS.ravel(), minlength=L.N_CLASSES)
    for label in L.LABELS:
        assert v[f"{label.name}_volume_mm3"] == pytest.approx(counts[label.id] * 3.3 * 0.4 * 0.35, rel=1e-12)
        assert v[f"{label.name}_volume_ml"] == pytest.approx(v[f"{label.name}_volume_mm3"] / 1000, rel=1e-12)
    muscles = sum(counts[lab.id] for lab in L.in_group("muscle"))
    assert v["total_muscle_volume_mm3"] == pytest.approx(muscles * 3.3 * 0.4 * 0.35)


@pytest.mark.parametrize("axis,spacing,k", [(1, (2.0, 0.4, 0.5), 5), (0, (0.7, 0.5, 0.5), 3), (2, (3.0, 0.3, 0.35), 6)])
def test_thickness_of_a_flat_plate_is_exact(axis, spacing, k):
    shape = [30, 30, 30]
    lab = np.zeros(shape, np.uint8)
    bone_sl = [slice(5, 25)] * 3
    bone_sl[axis] = slice(5, 12)
    cart_sl = list(bone_sl)
    cart_sl[axis] = slice(12, 12 + k)
    lab[tuple(bone_sl)] = L.by_name("tibia").id
    lab[tuple(cart_sl)] = L.by_name("medial_tibial_cartilage").id
    grid = _grid(shape, spacing)
    mean, mx = cartilage_thickness(lab, grid, "medial_tibial_cartilage")
    # the top face (20x20 voxels) is k voxels from bone; side faces taper; max is exact
    assert mx == pytest.approx(k * spacing[axis])
    top = k * spacing[axis]
    assert top * 0.6 < mean <= top
    # without side faces (plate spans the volume) the mean is exact too
    lab2 = np.zeros(shape, np.uint8)
    full_b, full_c = [slice(None)] * 3, [slice(None)] * 3
    full_b[axis], full_c[axis] = slice(5, 12), slice(12, 12 + k)
    lab2[tuple(full_b)] = L.by_name("tibia").id
    lab2[tuple(full_c)] = L.by_name("medial_tibial_cartilage").id
    mean2, mx2 = cartilage_thickness(lab2, grid, "medial_tibial_cartilage")
    assert mean2 == pytest.approx(top) and mx2 == pytest.approx(top)


def test_stray_plate_voxels_far_from_bone_do_not_change_thickness():
    shape, spacing = (20, 40, 40), (3.0, 0.5, 0.5)
    lab = np.zeros(shape, np.uint8)
    lab[:, 20:26, :] = L.by_name("tibia").id
    lab[:, 26:30, :] = L.by_name("medial_tibial_cartilage").id  # 4 voxels = 2.0 mm
    clean = cartilage_thickness(lab, _grid(shape, spacing), "medial_tibial_cartilage")
    lab[10, 2:4, 5:7] = L.by_name("medial_tibial_cartilage").id  # 8.5-9 mm from the tibia: a stray
    stray = cartilage_thickness(lab, _grid(shape, spacing), "medial_tibial_cartilage")
    assert clean == pytest.approx((2.0, 2.0)) and stray == pytest.approx(clean)


def test_thickness_is_nan_for_absent_plate():
    absent = cartilage_thickness(np.zeros((4, 4, 4), np.uint8), _grid((4, 4, 4), (1, 1, 1)), "patellar_cartilage")
    assert all(math.isnan(v) for v in absent)


def test_measure_row_matches_schema_and_flags_missing_tissue():
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[2:10, 2:18, 2:18] = L.by_name("femur").id
    lab[10:13, 2:18, 2:18] = L.by_name("femoral_cartilage").id
    image = np.stack([np.full(lab.shape, 100.0), np.where(lab > 0, 300.0, 10.0)])
    row = measure_study("k0", lab, image, _grid(lab.shape, (1.0, 1.0, 1.0)), ["T1", "T2"], "test")
    schema = measurement_schema()
    assert set(row) == set(schema.names)
    assert row["femoral_cartilage_volume_mm3"] == 3 * 16 * 16
    assert row["femoral_cartilage_thickness_p95_mm"] == pytest.approx(3.0)
    assert row["femoral_cartilage_t2_mean"] == 300.0 and row["femur_t1_mean"] == 100.0
    assert math.isnan(row["effusion_t1_mean"])
    assert "missing:tibia" in row["qc_flags"] and "missing:patella" in row["qc_flags"]
    assert row["qc_ok"] is False
    assert row["knee_side"] is None and row["knee_side_source"] is None  # no fibula, no tibia: undetermined
    assert all(name.endswith(("_mm3", "_ml", "_mm", "_mean", "_flags", "_ok", "_key", "_source", "_hash", "_version",
                              "_side", "_name", "_grid", "_used", "_days", "_set", "_pct", "_confidence"))
               for name in schema.names)


@pytest.mark.parametrize("ns", ["numpy", "torch", "array_api_strict"])
def test_qc_flags_fragmented_bone_and_fov(ns):
    from kneebatch.measure import qc_flags, study_values, values_to_host

    lab = np.zeros((20, 20, 20), np.uint8)
    lab[2:8, 2:8, 2:8] = L.by_name("tibia").id
    lab[12:18, 12:18, 12:18] = L.by_name("tibia").id
    lab[0:3, 5:9, 5:9] = L.by_name("patella").id  # touches the first slice
    grid = _grid(lab.shape, (1, 1, 1))
    row = volumes(lab, grid)
    row.update({f"{p.name}_thickness_mean_mm": math.nan for p in L.in_group("cartilage")})
    flags = qc_flags(values_to_host(study_values(_as(ns, lab), None, grid, ())), row)
    assert "fragmented:tibia" in flags and "fov_truncates:patella" in flags and "fragmented:patella" not in flags


@pytest.fixture(scope="module")
def knees(tmp_path_factory):
    """The truth of 6 synthetic knees of every anatomy range (a seed the reference did not use)."""
    from kneebatch.synth.cohort import ranges_for
    from kneebatch.training.synthesis import cached_volumes

    return cached_volumes(tmp_path_factory.mktemp("knees"), 5252, 6, ranges_for("train", "clinical", "varied"))


def test_plausibility_flags_a_shrunken_meniscus_and_no_true_knee(knees):
    """True knees of the varied range pass; the same knee with two thirds of its medial meniscus
    lost (what engines on an unfamiliar anatomy did) is flagged and not qc_ok."""
    from kneebatch.plausibility import implausible

    checked = 0
    for vol in knees:
        truth = vol.truth
        row = measure_study(vol.key, truth, None, vol.grid, [], "truth")
        if "fov_truncates:patella" in row["qc_flags"]:
            continue
        checked += 1
        assert not [f for f in row["qc_flags"] if f.startswith(("implausible", "thickness", "fragmented"))], \
            (vol.key, row["qc_flags"])
        shrunk = truth.copy()
        meniscus = np.argwhere(shrunk == L.by_name("medial_meniscus").id)
        lost = meniscus[np.random.default_rng(0).random(len(meniscus)) < 0.67]
        shrunk[tuple(lost.T)] = 0
        bad = measure_study(vol.key, shrunk, None, vol.grid, [], "segmentation")
        assert "implausible:medial_meniscus" in bad["qc_flags"] and bad["qc_ok"] is False
        assert "implausible:medial_meniscus/lateral_meniscus" in bad["qc_flags"]
        assert implausible({**row, "patella_volume_mm3": 0.0}) == []  # no patella: nothing to compare with
    assert checked >= 3


def test_qc_slices_carry_a_legend_of_the_tissues_they_show():
    from kneebatch.plots import OVERLAY_OPACITY, slices_figure

    lab = np.zeros((20, 24, 24), np.uint8)
    lab[5:15, 4:12, 4:20] = L.by_name("femur").id
    lab[5:15, 12:14, 4:20] = L.by_name("femoral_cartilage").id
    lab[0:2, 0:2, 0:2] = L.by_name("effusion").id  # far from the centre: on none of the three slices
    fig = slices_figure(np.random.default_rng(0).random(lab.shape), lab, (1.0, 0.5, 0.5))
    [legend] = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["femur", "femoral cartilage"]
    overlay = fig.axes[0].images[1].get_array()
    assert overlay[..., 3].max() == pytest.approx(OVERLAY_OPACITY) and OVERLAY_OPACITY <= 0.45


def test_qc_outlines_keep_each_tissue_edge_and_clear_its_inside():
    from kneebatch.plots import outlines, slices_figure

    lab = np.zeros((6, 7), np.uint8)
    lab[1:5, 1:6] = 3
    lab[2:4, 4:6] = 5
    edge = outlines(lab)
    assert edge[2, 2] == 0 and edge[3, 3] == 3  # inside 3; 3 beside 5
    assert edge[1, 1] == 3 and edge[0, 1] == 0  # its rim is labelled, the background beside it is not
    assert edge[2, 4] == 5 and edge[2, 5] == 5 and (edge[edge > 0] == lab[edge > 0]).all()
    assert (edge > 0).sum() == 18
    block = np.zeros((20, 24, 24), np.uint8)
    block[5:15, 4:12, 4:20] = L.by_name("femur").id
    fig = slices_figure(np.random.default_rng(0).random(block.shape), block, (1.0, 0.5, 0.5), outline=True)
    overlay = fig.axes[0].images[1].get_array()
    assert overlay[8, 12, 3] == 0 and overlay[4, 12, 3] == 1.0  # the inside clear, the edge opaque


@pytest.mark.parametrize("xp_name", ["numpy", "torch", "array_api_strict"])
def test_confidence_is_the_mean_winning_probability_per_label(xp_name):
    """The engines' confidence per label, on any namespace, equals a softmax written out by hand
    over the voxels each label wins (NaN for a label that wins none)."""
    import array_api_strict as xps

    from kneebatch import ops
    from kneebatch.inference.segment import confidence

    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (4, 5, 6, 7)).astype(np.float32)
    logits[3] -= 50  # label 3 never wins
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(0)) / np.exp(z - z.max(0)).sum(0)
    win, top = p.argmax(0), p.max(0)
    want = [top[win == k].mean() for k in range(3)]
    xp = {"numpy": np, "torch": ops.torch_namespace(), "array_api_strict": xps}[xp_name]
    got = ops.to_host(confidence(xp.asarray(logits), (5, 6, 7)))
    assert got[:3] == pytest.approx(want, rel=1e-12) and math.isnan(got[3])
    padded = np.concatenate([logits, np.zeros((4, 5, 6, 2), np.float32)], axis=3)  # a net's padded output
    assert ops.to_host(confidence(xp.asarray(padded), (5, 6, 7)))[:3] == pytest.approx(want, rel=1e-12)


def test_a_tissue_the_engines_are_unsure_of_is_flagged_against_their_reference():
    from kneebatch.plausibility import uncertain

    lab = np.zeros((20, 20, 20), np.uint8)
    lab[2:10, 2:18, 2:18] = L.by_name("femur").id
    lab[10:13, 2:18, 2:18] = L.by_name("femoral_cartilage").id
    grid = _grid(lab.shape, (1.0, 1.0, 1.0))
    conf = np.full(L.N_CLASSES, np.nan)
    conf[L.by_name("femur").id], conf[L.by_name("femoral_cartilage").id] = 0.99, 0.88
    conf[L.by_name("tibia").id] = 0.5  # won voxels on the working grid, none on the study's: no column value
    reference = {"femur": [0.992, 0.002], "femoral_cartilage": [0.95, 0.006], "tibia": [0.99, 0.002]}
    row = measure_study("k0", lab, None, grid, [], "segmentation", confidence=conf, confidence_reference=reference)
    assert row["femur_confidence"] == 0.99 and row["femoral_cartilage_confidence"] == 0.88
    assert row["tibia_confidence"] is None
    assert "uncertain:femoral_cartilage" in row["qc_flags"] and "uncertain:femur" not in row["qc_flags"]
    # (0.88 - 0.95) / (1.4826 x 0.006) = -7.9; femur: -0.67
    assert uncertain({"femoral_cartilage": 0.94}, reference) == []  # -1.1: within the held-out spread
    assert uncertain({"femoral_cartilage": 0.5}, None) == []  # no reference (an unrated set, another tool's model)
    plain = measure_study("k0", lab, None, grid, [], "store")  # imported labels: no confidence, no flag
    assert plain["femur_confidence"] is None and not [f for f in plain["qc_flags"] if f.startswith("uncertain")]


def test_thickness_map_regions_are_bordered_on_pixel_edges_between_regions_only():
    from kneebatch.plots import region_borders

    region = np.array([[0, 0, 1], [-1, 1, 1]])  # rows along y, columns along x; -1 off the plate
    segments = region_borders(region, (1.0, 2.0))
    assert sorted(segments) == sorted([[(2.0, 0.0), (2.0, 2.0)],  # between (0,1) and (0,2)
                                       [(1.0, 2.0), (2.0, 2.0)]])  # between (0,1) and (1,1); none at -1


def test_a_plate_far_thinner_or_thicker_than_the_reference_knees_is_flagged():
    from kneebatch.plausibility import THICKNESS_REFERENCE, thickness_outlier

    median, mad = THICKNESS_REFERENCE["femoral_cartilage"]
    assert 1.5 < median < 2.5 and mad > 0
    assert not thickness_outlier("femoral_cartilage", median + 0.5)
    assert thickness_outlier("femoral_cartilage", 0.8)  # a sliver: within 0.3-8 mm, yet no knee's
    assert thickness_outlier("femoral_cartilage", 4.5)
    assert not thickness_outlier("femoral_cartilage", float("nan")) and not thickness_outlier("femur", 9.0)
