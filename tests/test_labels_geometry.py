import json

import numpy as np
import pytest

from kneebatch import labels as L
from kneebatch.cli import main
from kneebatch.geometry import Grid, affine_from_nifti, affine_to_nifti, resample

REQUIRED = {
    "femur", "tibia", "fibula", "patella", "femoral_cartilage", "medial_tibial_cartilage",
    "lateral_tibial_cartilage", "patellar_cartilage", "medial_meniscus", "lateral_meniscus", "acl", "pcl",
    "mcl", "lcl", "patellar_tendon", "quadriceps_muscle", "hamstring_muscle", "gastrocnemius_muscle",
    "subcutaneous_fat", "effusion",
}


def test_schema_has_every_required_tissue_once():
    names = [label.name for label in L.LABELS]
    assert REQUIRED <= set(names)
    assert len(names) == len(set(names)) == 20
    assert sorted(label.id for label in L.LABELS) == list(range(1, 21))
    assert L.N_CLASSES == 21
    assert all(name == name.lower() and " " not in name for name in names)
    assert {label.name: label.bone for label in L.in_group("cartilage")} == {
        "femoral_cartilage": "femur", "medial_tibial_cartilage": "tibia",
        "lateral_tibial_cartilage": "tibia", "patellar_cartilage": "patella"}


def test_labels_json_cli(capsys):
    assert main(["labels", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) == 20
    assert set(data[0]) == {"id", "name", "group", "color"}
    assert data[0] == {"id": 1, "name": "femur", "group": "bone", "color": "#e3dac9"}
    assert all(len(d["color"]) == 7 and d["color"].startswith("#") for d in data)


def test_unknown_label_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown label 'femur_cart'"):
        L.by_name("femur_cart")


def _oblique_grid():
    direction = np.linalg.qr(np.array([[0.1, 1.0, 0.2], [0.9, 0.0, 0.3], [0.2, 0.1, -1.0]]))[0]
    return Grid.from_parts((20, 30, 40), (3.0, 0.5, 0.4), (-12.5, 40.0, 7.0), direction)


def test_grid_spacing_origin_crop_exact():
    g = _oblique_grid()
    assert np.allclose(g.spacing, (3.0, 0.5, 0.4))
    assert np.allclose(g.origin, (-12.5, 40.0, 7.0))
    assert g.voxel_volume_mm3 == pytest.approx(0.6)
    c = g.crop((2, 5, 7), (4, 6, 8))
    assert c.shape == (4, 6, 8)
    # voxel (0,0,0) of the crop is voxel (2,5,7) of the parent, in patient space
    assert np.allclose(c.index_to_world([0, 0, 0]), g.index_to_world([2, 5, 7]))
    assert np.allclose(c.index_to_world([1, 2, 3]), g.index_to_world([3, 7, 10]))
    assert np.allclose(g.world_to_index(g.index_to_world([[1.5, 2, 3]])), [[1.5, 2, 3]])
    assert Grid.from_attrs(g.to_attrs()).same_as(g)


def test_nifti_affine_round_trip_and_orientation():
    g = _oblique_grid()
    ras = affine_to_nifti(g.affine)
    assert np.allclose(affine_from_nifti(ras), g.affine)
    # a voxel (z,y,x) is NIfTI voxel (i,j,k) = (x,y,z); RAS = LPS with x,y negated
    lps = g.index_to_world([3, 4, 5])
    assert np.allclose((ras @ [5, 4, 3, 1])[:3], lps * [-1, -1, 1])


def test_resample_is_exact_on_a_shifted_grid():
    g = Grid.from_parts((10, 12, 14), (2.0, 1.0, 1.0), (0, 0, 0), np.eye(3))
    vol = np.random.default_rng(0).random(g.shape).astype(np.float32)
    shifted = g.crop((1, 2, 3), (5, 6, 7))  # same spacing, integer offset: values copy exactly
    out = resample(vol, g, shifted, order=1)
    assert np.allclose(out, vol[1:6, 2:8, 3:10], atol=1e-6)
    labels = (vol * 5).astype(np.uint8)
    assert np.array_equal(resample(labels, g, shifted, order=0), labels[1:6, 2:8, 3:10])


def test_an_orientation_code_gives_the_arrays_simpleitk_reads_from_such_a_nifti():
    import nibabel as nib

    from kneebatch.geometry import CANONICAL_LPS, Grid, affine_to_nifti, orientation_direction, to_canonical

    grid = Grid.from_parts((20, 30, 40), (3.0, 0.5, 0.6), (10.0, -20.0, 30.0), CANONICAL_LPS)
    turn = to_canonical(grid, orientation_direction("RAS"))
    array = np.arange(20 * 30 * 40, dtype=np.int32).reshape(20, 30, 40)
    ras, ras_grid = turn.apply(array, grid)
    # as a NIfTI (data[i, j, k] = array[k, j, i]) the turned array is nibabel's closest canonical
    img = nib.Nifti1Image(array.transpose(2, 1, 0), affine_to_nifti(grid.affine))
    canonical = nib.as_closest_canonical(img)
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    assert np.array_equal(np.asarray(canonical.dataobj).transpose(2, 1, 0), ras)
    assert np.allclose(affine_to_nifti(ras_grid.affine), canonical.affine)
    assert np.array_equal(turn.invert(ras, ras_grid), array)
    with pytest.raises(ValueError, match="one of each"):
        orientation_direction("RRS")
