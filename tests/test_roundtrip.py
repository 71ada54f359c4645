"""Cohort protocols and label maps in and out.

* An OAI-like study (sagittal 3-D DESS-WE + 2-D IW-TSE-FS) is stored with both channels and
  their roles, on the DESS grid; ``run`` records ``unsupported_contrast`` for it (the shipped
  engines need T1 + T2), never feeds it to the nets.
* ``export`` writes label maps (and images) in the source's voxel order; ``measure --labels``
  reads them back, by study key or UID, on the same or another grid, with ``--label-map``;
  unknown label ids are an error row, never a table of zeros.
"""

import csv
import json
import shutil
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest

from kneebatch import labels as L
from kneebatch.cli import main
from kneebatch.export import export_nifti
from kneebatch.geometry import Grid, affine_from_nifti, to_canonical
from kneebatch.ingest.nifti import write_label_nifti
from kneebatch.ingest.store import CohortStore
from kneebatch.jobs.convert import convert
from kneebatch.jobs.measure import measure_store
from kneebatch.keys import load_or_create_key, study_key
from kneebatch.outputs import read_rows
from kneebatch.synth.cohort import PRESETS, generate_cohort

VOLUMES = ("femur", "effusion", "medial_meniscus", "acl", "femoral_cartilage")


@pytest.fixture(scope="module")
def oai(tmp_path_factory, key_file):
    root = tmp_path_factory.mktemp("oai")
    generate_cohort(root / "cohort", 2, seed=3, workers=1, ranges=replace(PRESETS["small"], protocol="oai"))
    report = convert(root / "cohort" / "dicom", root / "store", key_file=key_file, show_progress=False)
    assert (report.converted, report.failed) == (2, 0)
    return root


def test_oai_study_keeps_both_series_with_their_roles(oai, key_file):
    manifest = json.loads((oai / "cohort" / "manifest.json").read_text())
    with open(oai / "cohort" / "clinical.csv") as f:
        side = {r["study_uid"]: r["side"].lower() for r in csv.DictReader(f)}
    s = CohortStore(oai / "store")
    for entry in manifest["studies"]:
        key = study_key(entry["study_uid"], load_or_create_key(key_file))
        attrs = s.study_attrs(key)
        assert s.channels(key) == ["DESS", "PDFS"] and attrs["reference_role"] == "DESS"
        dess, iw = [r for r in attrs["series"] if r["used"]]  # left-out series are recorded too
        assert (dess["acquisition_type"], dess["repetition_time_ms"], dess["flip_angle_deg"]) == ("3D", 16.3, 25.0)
        assert (iw["acquisition_type"], iw["echo_time_ms"], iw["resampled_to_reference"]) == ("2D", 30.0, True)
        assert iw["used"] is True and iw["overlap_fraction"] > 0.5
        # stored on the DESS grid, in the canonical order (here the synthetic order already is)
        dess_grid = Grid(tuple(entry["series"][entry["t1_series_uid"]]["shape_zyx"]),
                         np.array(entry["series"][entry["t1_series_uid"]]["affine"]))
        assert s.grid(key).same_as(dess_grid, atol_mm=1e-4) and to_canonical(dess_grid).is_identity
        assert attrs["knee_side"] == side[entry["study_uid"]]  # from "SAG_3D_DESS_RIGHT"


def test_run_records_unsupported_contrast_for_the_oai_protocol(oai, tiny_engines, tmp_path):
    from kneebatch.jobs.run import run

    work = tmp_path / "store"
    shutil.copytree(oai / "store", work)
    report = run(work, tmp_path / "out", engines_path=tiny_engines, show_progress=False)
    assert (report.segmented, report.failed) == (0, 2)
    failures = read_rows(tmp_path / "out" / "failures.parquet")
    assert {f["reason"] for f in failures} == {"unsupported_contrast"}
    assert all(f["message"].endswith(f"found DESS, PDFS; engine sets: {tiny_engines.name} needs T1 + T2FS|T2")
               for f in failures)
    assert read_rows(tmp_path / "out" / "measurements.parquet") == []
    assert all(not CohortStore(work).label_names(k) for k in CohortStore(work).study_keys())


# ---------------------------------------------------------------- labels out and back in
@pytest.fixture()
def segmented(store, cohort, tmp_path):
    """The session store with the truth put in as a segmentation (a known label map per study)."""
    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    s = CohortStore(work)
    uid_of = {r["study_key"]: r["study_uid"] for r in read_rows(s.keymap_path)}
    for key in s.study_keys():
        img = nib.load(cohort / "truth" / f"{uid_of[key]}.nii.gz")
        truth = np.asarray(img.dataobj).transpose(2, 1, 0)
        assert Grid(truth.shape, affine_from_nifti(img.affine)).same_as(s.grid(key), atol_mm=1e-4)
        s.write_labels(key, truth, {"model_hash": "aaaa+bbbb"}, name="labels-aaaa-bbbb")
    return work


def _by_key(out):
    return {r["study_key"]: r for r in read_rows(out / "measurements.parquet")}


def test_exports_remeasured_give_the_same_volumes(segmented, tmp_path):
    assert main(["measure", str(segmented), str(tmp_path / "m0"), "-q", "--workers", "1"]) == 0
    n, missing, used = export_nifti(segmented, tmp_path / "exp", images=True, show_progress=False)
    assert (n, missing, used) == (6, [], ["labels-aaaa-bbbb"])
    n, _, _ = export_nifti(segmented, tmp_path / "exp-uid", names="uid", show_progress=False)
    for folder, out in ((tmp_path / "exp", "m1"), (tmp_path / "exp-uid", "m2")):
        assert main(["measure", str(segmented), str(tmp_path / out), "--labels", str(folder), "-q",
                     "--workers", "1"]) == 0
    before, by_key, by_uid = (_by_key(tmp_path / m) for m in ("m0", "m1", "m2"))
    # which name matched is recorded, never the UID itself (an identifier)
    assert {r["label_name"] for r in by_uid.values()} == {"file named by study_uid"}
    assert {r["label_name"] for r in by_key.values()} == {"file named by study_key"}
    assert set(before) == set(by_key) == set(by_uid) and len(before) == 6
    for key, row in before.items():
        for name in VOLUMES:
            col = f"{name}_volume_mm3"
            assert by_key[key][col] == by_uid[key][col] == pytest.approx(row[col], rel=1e-12)
        assert by_key[key]["label_source"] == "file" and by_key[key]["label_grid"] in ("same_grid", "reoriented")
    # the exported images convert again into the same study image
    store2 = tmp_path / "again"
    report = convert(tmp_path / "exp", store2, show_progress=False)
    assert report.converted == 6
    s, s2 = CohortStore(segmented), CohortStore(store2)
    k2 = {r["study_uid"]: r["study_key"] for r in read_rows(s2.keymap_path)}
    for key in s.study_keys():
        image, grid = s.read_image(key)
        image2, grid2 = s2.read_image(k2[key])
        assert grid2.same_as(grid, atol_mm=1e-4) and np.array_equal(image2, image)
        assert s2.channels(k2[key]) == s.channels(key)


def test_labels_in_another_axis_order_are_mapped_exactly(segmented, tmp_path):
    s = CohortStore(segmented)
    key = s.study_keys()[0]
    labels = s.read_labels(key)
    folder = tmp_path / "ras"
    folder.mkdir()
    write_label_nifti(folder / f"{key}.nii.gz", labels, s.grid(key))
    img = nib.load(folder / f"{key}.nii.gz")
    ras = nib.as_closest_canonical(img)  # RAS+, another voxel order than the store's
    assert not np.array_equal(ras.affine, img.affine)
    nib.save(ras, folder / f"{key}.nii.gz")
    measure_store(segmented, tmp_path / "m", labels_dir=folder, show_progress=False)
    row = _by_key(tmp_path / "m")[key]
    assert row["label_grid"] == "reoriented"
    vv = s.grid(key).voxel_volume_mm3
    for name in VOLUMES:
        assert row[f"{name}_volume_mm3"] == pytest.approx(np.sum(labels == L.by_name(name).id) * vv, rel=1e-12)


def test_labels_on_another_grid_are_resampled_and_recorded(segmented, tmp_path):
    s = CohortStore(segmented)
    key = s.study_keys()[0]
    labels, grid = s.read_labels(key), s.grid(key)
    # the same label map on a grid of half the in-plane spacing (every voxel split in 2 x 2)
    fine = np.repeat(np.repeat(labels, 2, axis=1), 2, axis=2)
    a = grid.affine.copy()
    a[:3, 1:3] /= 2
    a[:3, 3] -= (grid.affine[:3, 1] + grid.affine[:3, 2]) / 4
    folder = tmp_path / "fine"
    folder.mkdir()
    write_label_nifti(folder / f"{key}_labels.nii.gz", fine, Grid(fine.shape, a))
    measure_store(segmented, tmp_path / "m", labels_dir=folder, show_progress=False)
    row = _by_key(tmp_path / "m")[key]
    assert row["label_grid"] == "resampled"
    vv = grid.voxel_volume_mm3
    for name in VOLUMES:  # nearest neighbour back onto the study grid: the same voxels
        assert row[f"{name}_volume_mm3"] == pytest.approx(np.sum(labels == L.by_name(name).id) * vv, rel=1e-9)


def test_unknown_label_ids_are_an_error_row_and_label_map_translates(segmented, tmp_path):
    s = CohortStore(segmented)
    key = s.study_keys()[0]
    foreign = np.zeros(s.grid(key).shape, np.uint8)
    foreign[2:5, 10:20, 10:20] = 40  # another data set's "femur"
    foreign[5:6, 10:20, 10:20] = 41
    folder = tmp_path / "foreign"
    folder.mkdir()
    write_label_nifti(folder / f"{key}.nii.gz", foreign, s.grid(key))
    measure_store(segmented, tmp_path / "m", labels_dir=folder, show_progress=False)
    failure = {f["study_key"]: f for f in read_rows(tmp_path / "m" / "failures.parquet")}[key]
    assert failure["reason"] == "unknown_label_ids" and "ids 40, 41" in failure["message"]
    assert key not in _by_key(tmp_path / "m")
    assert main(["measure", str(segmented), str(tmp_path / "m2"), "--labels", str(folder), "-q", "--workers", "1",
                 "--label-map", "40:femur,41:femoral_cartilage"]) == 0
    row = _by_key(tmp_path / "m2")[key]
    vv = s.grid(key).voxel_volume_mm3
    assert row["femur_volume_mm3"] == pytest.approx(300 * vv) and row["femoral_cartilage_volume_mm3"] == pytest.approx(
        100 * vv)
    # a map that misses an id of the file: an error row, not a table of zeros (41 dropped only when asked)
    measure_store(segmented, tmp_path / "m3", labels_dir=folder, label_map={300: 1}, show_progress=False)
    failure = {f["study_key"]: f for f in read_rows(tmp_path / "m3" / "failures.parquet")}[key]
    assert failure["reason"] == "unknown_label_ids" and "ids 40, 41 not in --label-map" in failure["message"]
    assert main(["measure", str(segmented), str(tmp_path / "m4"), "--labels", str(folder), "-q", "--workers", "1",
                 "--label-map", "40:femur,41:background"]) == 0
    row = _by_key(tmp_path / "m4")[key]
    assert row["femur_volume_mm3"] == pytest.approx(300 * vv) and row["femoral_cartilage_volume_mm3"] == 0
    with pytest.raises(ValueError, match="mapped twice"):
        from kneebatch.label_sets import parse_label_map

        parse_label_map("1:femur,1:tibia")


def test_truth_thickness_p95_against_the_synthetic_anatomy(tmp_path, key_file):
    """Robust thick end of each plate on perfect label maps: the 95th percentile stays near the
    generator's thickness on 3-D (thin-slice) studies, where the maximum is pulled out by the
    plate margins; on thick 2-D slices it is bounded by one slice step."""
    generate_cohort(tmp_path / "c", 3, seed=2024, workers=1)
    convert(tmp_path / "c" / "dicom", tmp_path / "s", key_file=key_file, show_progress=False)
    measure_store(tmp_path / "s", tmp_path / "m", labels_dir=tmp_path / "c" / "truth", show_progress=False)
    manifest = {e["study_uid"]: e for e in json.loads((tmp_path / "c" / "manifest.json").read_text())["studies"]}
    uid_of = {r["study_key"]: r["study_uid"] for r in read_rows(tmp_path / "s" / "keymap.parquet")}
    plates = {"femoral_cartilage": "cart_femoral_mm", "medial_tibial_cartilage": "cart_medial_tibial_mm",
              "lateral_tibial_cartilage": "cart_lateral_tibial_mm", "patellar_cartilage": "cart_patellar_mm"}
    thin = 0
    for key, row in _by_key(tmp_path / "m").items():
        anatomy = manifest[uid_of[key]]["anatomy"]
        for plate, param in plates.items():
            p95, truth = row[f"{plate}_thickness_p95_mm"], anatomy[param]
            if row["spacing_z_mm"] <= 1.2:
                assert abs(p95 - truth) <= 0.1 * truth, (plate, p95, truth)
            else:
                assert 0.9 * truth <= p95 <= truth + row["spacing_z_mm"], (plate, p95, truth)
        thin += row["spacing_z_mm"] <= 1.2
    assert thin >= 1
