import csv

import nibabel as nib
import numpy as np
import pydicom
import pytest

from kneebatch import labels as L
from kneebatch.geometry import affine_from_nifti
from kneebatch.synth.cohort import PRESETS, plan_subject, render_subject
from kneebatch.synth.render import CONTRAST


def test_plans_are_deterministic_per_seed_and_index():
    a, b = plan_subject(5, 3), plan_subject(5, 3)
    assert a.study_uid == b.study_uid and a.t1.series.uid == b.t1.series.uid
    assert np.array_equal(a.t1.grid.affine, b.t1.grid.affine)
    assert plan_subject(5, 4).study_uid != a.study_uid
    assert plan_subject(6, 3).study_uid != a.study_uid


def test_rendering_is_deterministic():
    plan = plan_subject(3, 0, PRESETS["small"])
    (img_a, truth_a), (img_b, truth_b) = render_subject(plan), render_subject(plan)
    assert np.array_equal(truth_a, truth_b)
    assert all(np.array_equal(img_a[k], img_b[k]) for k in img_a)


def test_protocol_ranges_cover_the_spec():
    plans = [plan_subject(1, i) for i in range(60)]
    inplane = [p.t1.grid.spacing[1] for p in plans]
    thick = [p.t1.thickness_mm for p in plans]
    assert 0.3 <= min(inplane) and max(inplane) <= 0.6
    assert 0.7 <= min(thick) and max(thick) <= 4.0
    assert min(thick) < 1.5 and max(thick) > 3.0  # thin 3D and thick 2D protocols both occur
    assert any(p.t1.grid.spacing[0] > p.t1.thickness_mm + 0.05 for p in plans)  # slice gaps
    assert any(not p.t2.grid.same_as(p.t1.grid) for p in plans)  # T2 on its own grid
    assert {p.group for p in plans} == {"normal", "OA"}
    assert {p.side for p in plans} == {"LEFT", "RIGHT"}
    for p in plans:
        assert (p.kl_grade <= 1) == (p.group == "normal")
        assert 18 <= p.age <= 90


def test_cohort_files(cohort, manifest):
    rows = list(csv.DictReader(open(cohort / "clinical.csv")))
    assert [list(r) for r in rows][0] == ["subject_id", "study_uid", "study_date", "group", "age", "sex", "kl_grade",
                                         "side"]
    assert len(rows) == 6 and [r["group"] for r in rows] == ["normal", "OA"] * 3
    for entry in manifest["studies"]:
        truth = nib.load(cohort / "truth" / f"{entry['study_uid']}.nii.gz")
        t1 = entry["series"][entry["t1_series_uid"]]
        assert truth.shape[::-1] == tuple(t1["shape_zyx"])
        assert np.allclose(affine_from_nifti(truth.affine), t1["affine"], atol=1e-4)
        assert set(np.unique(np.asarray(truth.dataobj))) <= {0, *range(1, 21)}


def test_dicom_headers_are_real_mr_with_identifiers(cohort, manifest):
    entry = manifest["studies"][0]
    folder = cohort / entry["series"][entry["t1_series_uid"]]["folder"]
    files = sorted(folder.iterdir())
    assert all(f.suffix == "" for f in files)  # OAI-style names without extension
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.StudyInstanceUID == entry["study_uid"]
    assert "^" in str(ds.PatientName) and len(ds.PatientID) == 7 and len(ds.PatientBirthDate) == 8
    assert ds.Modality == "MR" and float(ds.RepetitionTime) < 1000 and float(ds.EchoTime) < 30
    assert ds.pixel_array.shape == (ds.Rows, ds.Columns)


def _tissue_means(image, truth):
    """Mean signal of each tissue's core (one voxel in from its border), away from partial volume."""
    from scipy import ndimage

    out = {}
    for label in L.LABELS:
        core = ndimage.binary_erosion(truth == label.id, np.ones((1, 3, 3), bool))
        if np.any(core):
            out[label.name] = float(image[core].mean())
    return out


def test_mr_contrast_follows_tissue_physics():
    plan = plan_subject(4, 2)  # clinical resolution: thin structures have a core
    images, truth = render_subject(plan)
    t1, t2 = (_tissue_means(images[a.series.uid], truth) for a in (plan.t1, plan.t2))
    assert t1["effusion"] < 0.4 * t1["subcutaneous_fat"]  # fluid dark, fat bright on T1
    assert t2["effusion"] > 1.8 * t2["femoral_cartilage"]  # fluid bright on T2
    assert t2["subcutaneous_fat"] < 0.5 * t2["femoral_cartilage"]  # fat suppressed
    assert t1["acl"] < 0.5 * t1["quadriceps_muscle"] and t1["medial_meniscus"] < 0.5 * t1["femoral_cartilage"]
    assert CONTRAST["T1"]["cortex"] < 0.1 and CONTRAST["T2"]["cortex"] < 0.1


def _volume_ml(truth, grid, name):
    return np.sum(truth == L.by_name(name).id) * grid.voxel_volume_mm3 / 1000


def test_oa_knees_have_thinner_cartilage_and_more_effusion():
    normal = [plan_subject(8, i, PRESETS["small"]) for i in range(0, 12, 2)]
    oa = [plan_subject(8, i, PRESETS["small"]) for i in range(1, 12, 2)]
    assert {p.group for p in normal} == {"normal"} and {p.group for p in oa} == {"OA"}
    mean = lambda plans, f: np.mean([f(p) for p in plans])  # noqa: E731
    assert mean(oa, lambda p: p.anatomy.cart_medial_tibial_mm) < 0.85 * mean(normal, lambda p: p.anatomy.cart_medial_tibial_mm)
    assert mean(oa, lambda p: p.anatomy.effusion_scale) > 2.5 * mean(normal, lambda p: p.anatomy.effusion_scale)
    assert all(p.kl_grade >= 2 and p.anatomy.cart_defects for p in oa)
    eff = {}
    for group, plans in (("normal", normal[:2]), ("OA", oa[:2])):
        eff[group] = np.mean([_volume_ml(render_subject(p)[1], p.t1.grid, "effusion") for p in plans])
    assert eff["OA"] > 2 * eff["normal"]


def test_flexion_swings_the_lower_leg_back_and_leaves_the_femur():
    """Knee flexion in the phantom: the tibia rotates posteriorly about the condyles, the femur stays."""
    from dataclasses import replace as dc_replace

    from kneebatch import labels as L
    from kneebatch.geometry import Grid
    from kneebatch.synth.anatomy import Anatomy
    from kneebatch.synth.render import Pose, render_labels

    # canonical frame = patient frame for a right knee: x medial = L, y posterior = P, z superior = -I
    pose = Pose(np.eye(3), np.ones(3), np.zeros(3), "RIGHT")
    direction = np.array([[-1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]]).T  # z -> R, y -> I, x -> P
    shape = (30, 120, 100)
    grid = Grid.from_parts(shape, (3.0, 1.5, 1.5), direction @ -((np.array(shape) - 1) / 2 * [3.0, 1.5, 1.5]),
                           direction)

    def centroid(labels, name):
        idx = np.argwhere(labels == L.by_name(name).id).mean(0)
        return grid.index_to_world(idx)

    straight, _ = render_labels(Anatomy(), pose, grid, 3.0, 1)
    bent, _ = render_labels(dc_replace(Anatomy(), flexion_deg=30.0), pose, grid, 3.0, 1)
    f0, f1 = centroid(straight[0], "femur"), centroid(bent[0], "femur")
    t0, t1 = centroid(straight[0], "tibia"), centroid(bent[0], "tibia")
    assert np.abs(f1 - f0).max() < 0.5  # the femur does not move
    assert t1[1] - t0[1] > 10.0  # the tibia's visible part moves posteriorly (LPS +y)
    assert np.sum(bent[0] == L.by_name("acl").id) > 0.5 * np.sum(straight[0] == L.by_name("acl").id)


def test_anatomy_ranges_typical_is_todays_knee_and_extreme_is_at_the_ends():
    from dataclasses import replace as dc_replace

    typical = plan_subject(4, 1, PRESETS["small"])
    assert typical.anatomy.flexion_deg == 0 and typical.anatomy.meniscus_tear_deg is None
    plans = [plan_subject(4, i, dc_replace(PRESETS["small"], anatomy="extreme")) for i in range(6)]
    for p in plans:
        a = p.anatomy
        assert p.group == "OA" and p.kl_grade == 4
        assert a.flexion_deg >= 25 and a.varus_deg <= -6 and a.patella_height_mm >= 8 and a.effusion_scale >= 8
        assert p.pose.scale.mean() == pytest.approx(0.82, abs=0.03) or p.pose.scale.mean() == pytest.approx(1.18, abs=0.03)
    varied = [plan_subject(4, i, dc_replace(PRESETS["small"], anatomy="varied")).anatomy for i in range(40)]
    assert max(a.flexion_deg for a in varied) > 20 and min(a.flexion_deg for a in varied) < 8
    assert any(a.popliteal_cyst_mm > 0 for a in varied) and any(a.meniscus_tear_deg is not None for a in varied)
    with pytest.raises(ValueError, match="anatomy"):
        plan_subject(4, 0, dc_replace(PRESETS["small"], anatomy="odd"))
