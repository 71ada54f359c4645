import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from kneebatch import labels as L
from kneebatch.cli import main
from kneebatch.geometry import affine_from_nifti
from kneebatch.ingest.nifti import write_label_nifti
from kneebatch.ingest.store import CohortStore, segmentation_name
from kneebatch.jobs.measure import measure_store
from kneebatch.keys import load_or_create_key, study_key
from kneebatch.outputs import FAILURE_SCHEMA, read_rows, write_rows


def _truth(cohort, uid):
    img = nib.load(cohort / "truth" / f"{uid}.nii.gz")
    return np.asarray(img.dataobj).transpose(2, 1, 0), affine_from_nifti(img.affine)


def test_measure_truth_volumes_and_every_study_in_one_table(cohort, store, manifest, key_file, tmp_path):
    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    key = load_or_create_key(key_file)
    entries = manifest["studies"]
    # one convert failure carried over from the store
    write_rows([{"study_key": "kdeadbeef", "stage": "convert", "reason": "not_sagittal", "message": "x"}],
               FAILURE_SCHEMA, work / "failures.parquet")
    labels_dir = tmp_path / "labels"
    shutil.copytree(cohort / "truth", labels_dir)
    # one study without a label file, one whose label map is on another grid
    (labels_dir / f"{entries[0]['study_uid']}.nii.gz").unlink()
    lab, aff = _truth(cohort, entries[1]["study_uid"])
    from kneebatch.geometry import Grid

    write_label_nifti(labels_dir / f"{entries[1]['study_uid']}.nii.gz", lab[1:], Grid(lab[1:].shape, aff))
    report = measure_store(work, tmp_path / "out", labels_dir=labels_dir, show_progress=False)
    assert (report.measured, report.failed, report.carried_failures) == (4, 2, 1)
    rows = {r["study_key"]: r for r in read_rows(tmp_path / "out" / "measurements.parquet")}
    failures = {r["study_key"]: r for r in read_rows(tmp_path / "out" / "failures.parquet")}
    assert failures[study_key(entries[0]["study_uid"], key)]["reason"] == "no_labels"
    assert failures[study_key(entries[1]["study_uid"], key)]["reason"] == "label_geometry_mismatch"
    assert failures["kdeadbeef"]["stage"] == "convert"
    assert not set(rows) & set(failures)
    assert set(rows) | set(failures) == set(CohortStore(work).study_keys()) | {"kdeadbeef"}
    for e in entries[2:]:
        lab, _ = _truth(cohort, e["study_uid"])
        grid = CohortStore(work).grid(study_key(e["study_uid"], key))
        row = rows[study_key(e["study_uid"], key)]
        for name in ("effusion", "femur", "medial_meniscus", "acl"):
            expected = np.sum(lab == L.by_name(name).id) * grid.voxel_volume_mm3
            assert row[f"{name}_volume_mm3"] == pytest.approx(expected, rel=1e-9)
            assert row[f"{name}_volume_ml"] == pytest.approx(expected / 1000, rel=1e-9)
        assert row["label_source"] == "file" and row["label_grid"] == "same_grid"
        # every plate measured, thickness in a plausible range for these synthetic knees
        for plate in L.in_group("cartilage"):
            assert 0.5 < row[f"{plate.name}_thickness_mean_mm"] < 4.5
        assert row["effusion_t2fs_mean"] > 1.5 * row["femoral_cartilage_t2fs_mean"]
        assert np.isnan(row["effusion_t2_mean"])  # no such channel


def test_measure_store_labels_written_by_segmentation(cohort, store, manifest, key_file, tmp_path):
    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    s = CohortStore(work)
    key = load_or_create_key(key_file)
    e = manifest["studies"][2]
    k = study_key(e["study_uid"], key)
    lab, _ = _truth(cohort, e["study_uid"])
    s.write_labels(k, lab, {"model_hash": "aaaa+bbbb"}, name=segmentation_name("aaaa+bbbb"))
    assert np.array_equal(s.read_labels(k), lab)
    report = measure_store(work, tmp_path / "out", show_progress=False)
    assert (report.measured, report.failed, report.models) == (1, 5, ["aaaa+bbbb"])
    failures = read_rows(tmp_path / "out" / "failures.parquet")
    assert {f["reason"] for f in failures} == {"no_labels"}
    row = read_rows(tmp_path / "out" / "measurements.parquet")[0]
    assert row["study_key"] == k and row["label_source"] == "store" and row["model_hash"] == "aaaa+bbbb"
    assert row["label_name"] == "labels-aaaa-bbbb"


def test_cli_synth_convert_measure_on_a_dask_cluster(tmp_path, key_file, capsys):
    assert main(["synth", str(tmp_path / "c"), "--n", "3", "--seed", "5", "--preset", "small", "--workers", "1",
                 "-q"]) == 0
    assert main(["convert", str(tmp_path / "c" / "dicom"), str(tmp_path / "s"), "--workers", "2", "-q"]) == 0
    out = capsys.readouterr().out
    assert "3 studies found" in out and "3 converted" in out
    assert main(["measure", str(tmp_path / "s"), str(tmp_path / "m"), "--labels", str(tmp_path / "c" / "truth"),
                 "--workers", "2", "-q"]) == 0
    rows = read_rows(tmp_path / "m" / "measurements.parquet")
    assert len(rows) == 3 and all(r["total_muscle_volume_ml"] > 10 for r in rows)
    assert read_rows(tmp_path / "m" / "failures.parquet") == []


def test_cli_help_and_errors(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("synth", "convert", "measure", "demo", "labels"):
        assert cmd in out
    assert main(["measure", str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert "no cohort store" in capsys.readouterr().err


def test_downstream_commands_use_the_label_maps_a_run_wrote_and_say_whose(store, tmp_path, capsys):
    """Two segmentations per study, the second newer: --run OUT takes the maps that run wrote
    (named by its engine set), not the newest; without it the newest, and qc says whose."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    s = CohortStore(work)
    keys = s.study_keys()[:2]
    femur = L.by_name("femur").id
    for key in keys:
        shape = s.grid(key).shape
        old, new = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
        old[:4, :8, :8] = femur  # 256 voxels
        new[:2, :8, :8] = femur  # 128
        s.write_labels(key, old, {"model_hash": "aaa", "engine_set": "t1-t2"}, name=segmentation_name("aaa"))
        s.write_labels(key, new, {"model_hash": "bbb", "engine_set": "dess-pdfs"}, name=segmentation_name("bbb"))
    run_out = tmp_path / "run-a"
    run_out.mkdir()
    pq.write_table(pa.table({"study_key": keys, "label_name": [segmentation_name("aaa")] * 2}),
                   run_out / "measurements.parquet")

    assert main(["measure", str(work), str(tmp_path / "m"), "--run", str(run_out), "-q"]) == 0
    assert f"the label maps run {run_out} wrote" in capsys.readouterr().out
    rows = {r["study_key"]: r for r in read_rows(tmp_path / "m" / "measurements.parquet")}
    voxel = s.grid(keys[0]).voxel_volume_mm3
    assert {k: r["femur_volume_mm3"] for k, r in rows.items()} == {k: 256 * s.grid(k).voxel_volume_mm3
                                                                    for k in keys}
    assert all(r["label_name"] == segmentation_name("aaa") for r in rows.values()) and voxel > 0
    # the studies the run did not segment have no label map of it
    failed = read_rows(tmp_path / "m" / "failures.parquet")
    assert {f["reason"] for f in failed} == {"no_labels"} and len(failed) == len(s.study_keys()) - 2

    assert main(["qc", str(work), str(tmp_path / "qc"), "-q"]) == 0  # newest
    assert f"label maps: engine set dess-pdfs ({segmentation_name('bbb')}) for 2 studies" in capsys.readouterr().out
    assert main(["qc", str(work), str(tmp_path / "qc2"), "--run", str(run_out), "-q"]) == 0
    assert f"engine set t1-t2 ({segmentation_name('aaa')}) for 2 studies" in capsys.readouterr().out
    assert main(["export", str(work), str(tmp_path / "x"), "--run", str(run_out), "-q"]) == 0
    assert segmentation_name("aaa") in capsys.readouterr().out
    exported = nib.load(tmp_path / "x" / f"{keys[0]}_labels.nii.gz")
    assert int(np.sum(np.asarray(exported.dataobj) == femur)) == 256
    assert main(["qc", str(work), str(tmp_path / "qc3"), "--run", str(tmp_path / "nothing")]) != 0
    assert "no measurements.parquet" in capsys.readouterr().err
    # a run made from another store is refused, not silently matched to nothing
    (run_out / ".kneebatch.json").write_text(json.dumps({"command": "run", "settings": {"store": str(store)}}))
    for command in (["qc", str(work), str(tmp_path / "qc4")], ["export", str(work), str(tmp_path / "x2")],
                    ["measure", str(work), str(tmp_path / "m2")]):
        assert main([*command, "--run", str(run_out), "-q"]) == 2
        assert f"was made from the store {store}, not {work}" in capsys.readouterr().err
        assert not Path(command[2]).exists()
