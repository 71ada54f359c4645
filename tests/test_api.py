"""The Python API: one image in memory segmented as `run` segments the stored study (the same
label map, in the image's own voxel order, from kneebatch's or NIfTI's affine), the store and a
job's results read back."""

import shutil

import numpy as np
import pytest

import kneebatch
from kneebatch.distributed.cluster import available_cores
from kneebatch.geometry import affine_to_nifti
from kneebatch.jobs.run import run


@pytest.fixture(scope="module")
def segmented(store, tiny_engines, tmp_path_factory):
    """A run over a copy of the session's store (its label maps never reach the shared one)."""
    root = tmp_path_factory.mktemp("api")
    shutil.copytree(store, root / "store.zarr")
    run(root / "store.zarr", root / "out", engines_path=tiny_engines, show_progress=False)
    return root


def test_segment_equals_run_in_any_voxel_order(tiny_engines, segmented):
    store, segmented = segmented / "store.zarr", segmented / "out"
    s = kneebatch.open_store(store)
    results = kneebatch.read_results(segmented)
    assert len(results.measurements) == 6 and len(results.failures) == 0
    assert results.provenance["command"] == "run"
    row = results.measurements.iloc[0]
    key = row["study_key"]
    image, grid = s.read_image(key)
    expected = s.read_labels(key, row["label_name"])
    assert len(np.unique(expected)) > 2  # the comparison means something
    kwargs = {"roles": s.channels(key), "engines": tiny_engines, "threads": available_cores()}
    got = kneebatch.segment(image, grid.affine, measure=True, **kwargs)
    assert np.array_equal(got.labels, expected) and got.model_hash == row["model_hash"]
    assert got.channels_used == s.channels(key) and got.engine_set == row["engine_set"]
    for name in ("femur_volume_mm3", "effusion_volume_ml", "femoral_cartilage_thickness_mean_mm"):
        assert got.measurements[name] == pytest.approx(row[name], rel=1e-9, nan_ok=True)
    # the same study in its source's voxel order (a flipped, transposed array): labels come back in that order
    reorientation, source = s.source_order(key)
    flipped = reorientation.invert(image, source)
    assert flipped.shape[1:] == source.shape
    theirs = kneebatch.segment(flipped, source.affine, **kwargs)
    assert np.array_equal(theirs.labels, reorientation.invert(expected, source))
    # as a NIfTI reader gives it: data [x, y, z] (i, j, k) with its RAS affine
    nifti = np.ascontiguousarray(flipped.transpose(0, 3, 2, 1))
    from_nifti = kneebatch.segment(nifti.transpose(0, 3, 2, 1), nifti_affine=affine_to_nifti(source.affine), **kwargs)
    assert np.array_equal(from_nifti.labels, theirs.labels)


def test_api_misuse_is_a_clear_error(store, tiny_engines, tmp_path):
    s = kneebatch.open_store(store)
    key = s.study_keys()[0]
    image, grid = s.read_image(key)
    with pytest.raises(ValueError, match="2 channels but 1 roles"):
        kneebatch.segment(image, grid.affine, roles=["T1"], engines=tiny_engines)
    with pytest.raises(ValueError, match="give the image's grid"):
        kneebatch.segment(image, roles=["T1", "T2FS"], engines=tiny_engines)
    with pytest.raises(Exception, match="unsupported_contrast|found STIR"):
        kneebatch.segment(image[:1], grid.affine, roles=["STIR"], engines=tiny_engines)
    with pytest.raises(FileNotFoundError, match="has not finished"):
        kneebatch.read_results(tmp_path)
