"""Misuse and hostile inputs: one clear line and a non-zero exit, nothing written or lost.

Each test provokes a real fault (a killed worker, a full disk, a folder with files in it,
Ctrl-C on a running command) or a real misuse of the command line.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from kneebatch.cli import main
from kneebatch.geometry import Grid, affine_to_nifti
from kneebatch.ingest.store import CohortStore
from kneebatch.jobs.convert import convert
from kneebatch.outputs import read_rows
from tests import faulty


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one clear line, no traceback
    return err[0]


# ---------------------------------------------------------------- command-line misuse
def test_missing_source_writes_nothing(tmp_path, capsys, key_file):
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "store")]) == 2
    assert "does not exist" in _err_line(capsys)
    assert not (tmp_path / "store").exists()


def test_convert_into_a_folder_with_files_keeps_every_file(cohort, tmp_path, capsys, key_file):
    mine = tmp_path / "my-results"
    mine.mkdir()
    (mine / "thesis.txt").write_text("four years of work")
    assert main(["convert", str(cohort / "dicom"), str(mine), "-q", "--workers", "1"]) == 2
    assert "not a kneebatch cohort store" in _err_line(capsys)
    assert [p.name for p in mine.iterdir()] == ["thesis.txt"]
    assert (mine / "thesis.txt").read_text() == "four years of work"


def test_missing_labels_folder_and_bad_label_map(store, tmp_path, capsys):
    assert main(["measure", str(store), str(tmp_path / "m"), "--labels", str(tmp_path / "nope")]) == 2
    assert "labels folder" in _err_line(capsys) and not (tmp_path / "m").exists()
    assert main(["measure", str(store), str(tmp_path / "m"), "--labels", str(tmp_path),
                 "--label-map", "1:femur,2:thighbone"]) == 2
    assert "--label-map" in _err_line(capsys) and not (tmp_path / "m").exists()
    assert main(["measure", str(store), str(tmp_path / "m"), "--labels", str(tmp_path), "--label-map", "x:femur"]) == 2
    assert "--label-map" in _err_line(capsys)


@pytest.mark.parametrize("value", ["0", "-3", "four"])
def test_bad_batch_size_is_one_line(store, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as e:
        main(["run", str(store), str(tmp_path / "o"), "--batch-size", value])
    assert e.value.code == 2
    assert "--batch-size" in _err_line(capsys) and not (tmp_path / "o").exists()


def test_cuda_without_cuda_is_refused_not_run_on_the_cpu(store, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["run", str(store), str(tmp_path / "o"), "--device", "cuda", "--backend", "torch"]) == 2
    assert "no CUDA device" in _err_line(capsys) and not (tmp_path / "o").exists()


def test_onnxruntime_with_half_is_refused_not_recorded_as_half(store, tmp_path, capsys):
    """ONNX Runtime runs the float32 ONNX files: --half would have been recorded (and its label
    maps named '-half') for a float32 run."""
    assert main(["run", str(store), str(tmp_path / "o"), "--backend", "onnxruntime", "--half"]) == 2
    assert "ONNX Runtime runs the float32 ONNX files" in _err_line(capsys) and not (tmp_path / "o").exists()


def test_provenance_records_what_ran_the_precision_and_a_sets_own_tta(store, tiny_engines, tmp_path):
    import json

    from kneebatch.jobs.run import run

    engines = tmp_path / "engines"
    shutil.copytree(tiny_engines, engines)
    manifest = json.loads((engines / "engines.json").read_text())
    cfg = json.loads((engines / "model_config.json").read_text())
    cfg["mirror_tta"] = True  # the set asks for TTA itself; the run's option does not
    (engines / "model_config.json").write_text(json.dumps(cfg))
    manifest.pop("config_sha256")
    (engines / "engines.json").write_text(json.dumps(manifest))
    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    run(work, tmp_path / "out", engines_path=engines, backend="torch", half=True, batch_size=6, show_progress=False)
    prov = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert (prov["precision"], prov["half_precision"], prov["mirror_tta"]) == ("bf16", True, False)
    assert prov["engines"]["engines"]["mirror_tta"] is True
    names = CohortStore(work).label_names(CohortStore(work).study_keys()[0])
    assert [n for n in names if n.startswith("labels-")][0].endswith("-tta-half")  # the label map says so too


def test_onnxruntime_on_cuda_without_its_cuda_provider_is_refused(store, tmp_path, capsys):
    """ONNX Runtime would fall back to the CPU without a word: a run recorded as cuda must not."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has its CUDA provider")
    assert main(["run", str(store), str(tmp_path / "o"), "--device", "cuda", "--backend", "onnxruntime"]) == 2
    assert "needs onnxruntime-gpu" in _err_line(capsys) and not (tmp_path / "o").exists()


def test_the_default_engines_on_a_gpu_are_compiled_float16(store, tmp_path, monkeypatch):
    """``--device cuda`` alone: torch-compile in float16 (ONNX Runtime would need onnxruntime-gpu);
    the CPU default stays ONNX Runtime in float32."""
    import kneebatch.jobs.run as job

    chosen = []

    def stand_in(store, out, options, **kw):
        chosen.append(options)
        raise ValueError("stopped before running")

    monkeypatch.setattr(job, "run", stand_in)
    for extra in (["--device", "cuda"], [], ["--device", "cuda", "--backend", "torch", "--net-batch", "2"]):
        assert main(["run", str(store), str(tmp_path / "o"), *extra]) == 2
    assert [(o.backend, o.device, o.half, o.effective_net_batch()) for o in chosen] == [
        ("torch-compile", "cuda", True, 4), ("onnxruntime", "cpu", False, 1), ("torch", "cuda", False, 2)]
    with pytest.raises(SystemExit) as refused:
        main(["run", str(store), str(tmp_path / "o"), "--net-batch", "0"])
    assert refused.value.code == 2 and len(chosen) == 3


def test_missing_tensorrt_says_how_to_install_it(store, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed")
    assert main(["run", str(store), str(tmp_path / "o"), "--backend", "tensorrt", "--device", "cuda"]) == 2
    assert "pip install tensorrt" in _err_line(capsys) and not (tmp_path / "o").exists()


def test_ctrl_c_says_how_to_resume_and_the_rerun_finishes(cohort, tmp_path, key_file):
    store = tmp_path / "store"
    args = ["convert", str(cohort / "dicom"), str(store), "--workers", "1", "--key-file", str(key_file)]
    # each study made to take a second longer, so the interrupt lands mid-run however fast the machine;
    # Ctrl-C's default handler, as in a terminal (a shell's background job inherits SIGINT ignored)
    slowed = ("import signal, sys, time; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "import kneebatch.jobs.convert as c; pair = c.convert_batch; "
              "c.convert_batch = lambda *a, **k: (time.sleep(1.0), pair(*a, **k))[1]; "
              "from kneebatch.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", slowed, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while not (store / "keymap.parquet").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted — rerun the same command to resume" in err and "Traceback" not in err
    assert len(CohortStore(store).study_keys()) < 6  # stopped part way: the rerun has work left
    done = subprocess.run([sys.executable, "-m", "kneebatch.cli", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(CohortStore(store).study_keys()) == 6 and read_rows(store / "failures.parquet") == []


def test_stores_inside_the_source_are_skipped_and_stores_do_not_nest(cohort, store, tmp_path, key_file):
    src = tmp_path / "src"
    shutil.copytree(cohort / "dicom", src)
    shutil.copytree(store, src / "old-store.zarr")  # an earlier store kept in the data tree
    report = convert(src, tmp_path / "s", key_file=key_file, show_progress=False)
    assert (report.converted, report.files_rejected) == (6, 0)  # none of the store's files was scanned
    with pytest.raises(ValueError, match="inside the cohort store"):
        convert(src, tmp_path / "s" / "nested", key_file=key_file, show_progress=False)
    assert not (tmp_path / "s" / "nested").exists()


def test_export_never_writes_into_a_folder_of_other_files(store, tmp_path):
    from kneebatch.export import export_nifti

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "k123_labels.nii.gz").write_bytes(b"my own segmentation")
    with pytest.raises(ValueError, match="not made by kneebatch"):
        export_nifti(store, mine, show_progress=False)
    assert (mine / "k123_labels.nii.gz").read_bytes() == b"my own segmentation"


def test_a_store_refuses_a_second_key(cohort, store, tmp_path, capsys):
    """Keys made with two secrets would store every study twice under two names."""
    work = tmp_path / "store"
    shutil.copytree(store, work)
    before = sorted(p.name for p in work.iterdir())
    assert main(["convert", str(cohort / "dicom"), str(work), "--key-file", str(tmp_path / "other.key"), "-q",
                 "--workers", "1"]) == 2
    assert "another study-key secret" in _err_line(capsys)
    assert sorted(p.name for p in work.iterdir()) == before


# ---------------------------------------------------------------- outputs never mix or vanish
def test_rerun_with_other_settings_refuses_and_force_starts_clean(store, tiny_engines, tmp_path):
    from kneebatch.jobs.run import run

    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    out = tmp_path / "out"
    run(work, out, engines_path=tiny_engines, batch_size=6, show_progress=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="mirror_tta"):
        run(work, out, engines_path=tiny_engines, batch_size=6, tta=True, show_progress=False)
    report = run(work, out, engines_path=tiny_engines, batch_size=6, tta=True, force=True, show_progress=False)
    assert report.segmented == 6 and report.already_done == 0  # nothing resumed from the other settings
    assert (out / "notes.txt").read_text() == "mine"  # only kneebatch's own files went
    import json

    assert json.loads((out / "provenance.json").read_text())["mirror_tta"] is True
    # the TTA label maps are kept beside the plain ones, not over them
    names = CohortStore(work).label_names(CohortStore(work).study_keys()[0])
    assert len(names) == 2 and names[1] == names[0] + "-tta"
    # an OUT of another command is refused with what it holds
    with pytest.raises(ValueError, match="holds the outputs of 'kneebatch run'"):
        from kneebatch.jobs.measure import measure_store

        measure_store(work, out, show_progress=False)


def test_run_into_a_folder_kneebatch_did_not_make_is_refused(store, tiny_engines, tmp_path):
    from kneebatch.jobs.run import run

    out = tmp_path / "papers"
    out.mkdir()
    (out / "measurements.parquet").write_bytes(b"not ours")
    with pytest.raises(ValueError, match="not made by kneebatch"):
        run(store, out, engines_path=tiny_engines, show_progress=False)
    assert (out / "measurements.parquet").read_bytes() == b"not ours"


def test_two_engines_keep_two_label_maps(store, tiny_engines, tmp_path):
    """Label maps are kept per model: a second engines set never overwrites the first."""
    import torch

    from kneebatch.export import export_nifti
    from kneebatch.jobs.run import run
    from kneebatch.models.checkpoints import save_weights
    from kneebatch.models.config import build_network
    from kneebatch.training.publish import publish
    from tests.conftest import TINY

    train_dir = tmp_path / "train2"
    train_dir.mkdir()
    (train_dir / "model_config.json").write_text(TINY.to_json())
    torch.manual_seed(1)  # other weights: another model hash
    for stage, net in (("coarse", TINY.coarse), ("fine", TINY.fine)):
        save_weights(train_dir / f"{stage}.safetensors", build_network(net, 2, TINY.n_classes).state_dict(),
                     {"stage": stage, "val_score": 0.0}, dtype=torch.float16)
    publish(train_dir, tmp_path / "engines2")
    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    run(work, tmp_path / "a", engines_path=tiny_engines, show_progress=False)
    run(work, tmp_path / "b", engines_path=tmp_path / "engines2", show_progress=False)
    s = CohortStore(work)
    key = s.study_keys()[0]
    hash_a = read_rows(tmp_path / "a" / "measurements.parquet")[0]["model_hash"]
    hash_b = read_rows(tmp_path / "b" / "measurements.parquet")[0]["model_hash"]
    assert hash_a != hash_b
    assert [n for n in s.label_names(key) if n.startswith("labels-")] == sorted(
        "labels-" + h.replace("+", "-") for h in (hash_a, hash_b))
    # export and measure say which they use: the newest by default, or the one asked for
    _, _, used = export_nifti(work, tmp_path / "exp", show_progress=False)
    assert used == ["labels-" + hash_b.replace("+", "-")]
    _, _, used = export_nifti(work, tmp_path / "exp-a", model=hash_a.split("+")[0], show_progress=False)
    assert used == ["labels-" + hash_a.replace("+", "-")]


# ---------------------------------------------------------------- faults while converting
def test_a_study_that_kills_its_convert_worker_is_recorded(cohort, tmp_path, key_file):
    from kneebatch.distributed.cluster import dask_client
    from kneebatch.jobs.convert import discover
    from kneebatch.keys import load_or_create_key, study_key

    studies, _, _ = discover(cohort / "dicom")
    poison = study_key(sorted(studies)[3], load_or_create_key(key_file))
    store = tmp_path / "store"
    with dask_client("local", n_workers=2) as client:
        report = convert(cohort / "dicom", store, client=client, key_file=key_file, show_progress=False,
                         batch_fn=partial(faulty.crash_converting, poison=poison))
    assert (report.converted, report.failed, report.reasons) == (5, 1, {"worker_died": 1})
    (failure,) = read_rows(store / "failures.parquet")
    assert failure["study_key"] == poison and failure["reason"] == "worker_died"
    # the next convert (the crash fixed) converts it and clears the row
    report = convert(cohort / "dicom", store, key_file=key_file, show_progress=False)
    assert (report.converted, report.already_done) == (1, 5) and read_rows(store / "failures.parquet") == []


@pytest.fixture()
def small_disk(tmp_path):
    """A 3 MB file system (tmpfs): writes run out of space for real."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,nr_inodes=4096", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(path):
    """Write zeros until the file system is full (some file systems refuse even the open then)."""
    try:
        with open(path, "wb") as f:
            while True:
                f.write(b"\0" * 65536)
    except OSError as e:
        assert e.errno == 28
    left = os.statvfs(path.parent)
    assert left.f_bavail * left.f_frsize < 65536 or left.f_favail == 0


def test_full_disk_leaves_only_whole_studies_and_a_rerun_completes(cohort, store, small_disk, key_file):
    target = small_disk / "store"
    try:
        report = convert(cohort / "dicom", target, key_file=key_file, show_progress=False)
        assert report.failed > 0  # the disk filled up: those studies are failure rows
    except OSError as e:  # or even the failures table found no room
        assert e.errno == 28
    reference = CohortStore(store)
    assert len(CohortStore(target).study_keys()) < 6
    for key in CohortStore(target).study_keys():  # whatever is there is whole
        assert np.array_equal(CohortStore(target).read_image(key)[0], reference.read_image(key)[0])
    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
    report = convert(cohort / "dicom", target, key_file=key_file, show_progress=False)
    s = CohortStore(target)
    assert s.study_keys() == reference.study_keys() and read_rows(target / "failures.parquet") == []
    assert not any((target / ".partial").iterdir())  # what the full disk left half-written is gone
    for key in s.study_keys():
        assert np.array_equal(s.read_image(key)[0], reference.read_image(key)[0])


def test_label_maps_are_written_atomically_on_a_full_disk(store, small_disk):
    work = small_disk / "s"
    s = CohortStore(store)
    key = s.study_keys()[0]
    # a one-study store on the small disk
    ws = CohortStore(work)
    image, grid = s.read_image(key)
    ws.write_study(key, image[:1], grid, ["T1"], {})
    first = (np.arange(np.prod(grid.shape)) % 21).astype(np.uint8).reshape(grid.shape)
    ws.write_labels(key, first, name="labels-a-b")
    _fill(small_disk / "filler")
    noise = np.random.default_rng(0).integers(0, 21, grid.shape).astype(np.uint8)  # incompressible
    with pytest.raises(OSError):
        ws.write_labels(key, noise, name="labels-a-b")
    assert np.array_equal(ws.read_labels(key, "labels-a-b"), first)
    assert not [p for p in (work / key).iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- hostile files
def _nifti(path, data, direction=((-1.0, 0, 0), (0, 0, -1.0), (0, 1.0, 0)), spacing=(3.0, 0.5, 0.5)):
    grid = Grid.from_parts(data.shape, spacing, (0.0, 0.0, 0.0), np.array(direction).T)
    nib.save(nib.Nifti1Image(np.asarray(data).transpose(2, 1, 0), affine_to_nifti(grid.affine)), path)


def test_unusable_values_are_refused_with_a_reason(tmp_path, key_file):
    rng = np.random.default_rng(0)
    good = rng.integers(10, 3000, (12, 24, 20)).astype(np.uint16)
    src = tmp_path / "src"
    src.mkdir()
    _nifti(src / "constant_T1.nii.gz", np.full((12, 24, 20), 7, np.uint16))
    _nifti(src / "negative_T1.nii.gz", good.astype(np.int32) - 5000)
    _nifti(src / "huge_T1.nii.gz", good.astype(np.int32) + 70000)
    _nifti(src / "complex_T1.nii.gz", good.astype(np.complex64))
    # no qform/sform: the voxel size alone, and one of them 0 mm (nibabel would write 1 mm)
    nib.save(nib.Nifti1Image(good.transpose(2, 1, 0), None), src / "zerospacing_T1.nii")
    raw = bytearray((src / "zerospacing_T1.nii").read_bytes())
    raw[88:92] = np.array([0.0], "<f4").tobytes()  # pixdim[3]
    (src / "zerospacing_T1.nii").write_bytes(bytes(raw))
    _nifti(src / "axial_T1.nii.gz", good, direction=((0, 0, -1.0), (0, 1.0, 0), (-1.0, 0, 0)))
    _nifti(src / "infslope_T1.nii", good.astype(np.float32))
    raw = bytearray((src / "infslope_T1.nii").read_bytes())
    raw[112:116] = np.array([np.inf], "<f4").tobytes()  # scl_slope: nibabel refuses to write it
    (src / "infslope_T1.nii").write_bytes(bytes(raw))
    # the T2 lies 300 mm away: no overlap, so it is left out (recorded), not stored as zeros
    _nifti(src / "apart_T1.nii.gz", good)
    far = Grid.from_parts(good.shape, (3.0, 0.5, 0.5), (300.0, 0.0, 0.0), np.array(((-1.0, 0, 0), (0, 0, -1.0),
                                                                                          (0, 1.0, 0))).T)
    nib.save(nib.Nifti1Image(good.transpose(2, 1, 0), affine_to_nifti(far.affine)), src / "apart_T2.nii.gz")
    # a header that claims 30000 x 30000 x 1000 voxels: refused from the header alone
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 1000))
    header.set_data_dtype(np.uint16)
    with open(src / "bomb_T1.nii", "wb") as f:
        f.write(header.binaryblock + b"\0" * (352 - len(header.binaryblock)) + b"\0" * 1024)
    report = convert(src, tmp_path / "s", key_file=key_file, show_progress=False)
    failures = {r["study_key"]: r for r in read_rows(tmp_path / "s" / "failures.parquet")}
    keymap = {r["study_uid"]: r["study_key"] for r in read_rows(tmp_path / "s" / "keymap.parquet")}
    expected = {"constant": "constant_image", "negative": "out_of_range_values", "huge": "out_of_range_values",
                "complex": "bad_dtype", "zerospacing": "bad_geometry", "axial": "not_sagittal",
                "infslope": "bad_scaling", "bomb": "too_large"}
    assert {case: failures[keymap[case]]["reason"] for case in expected} == expected
    for row in failures.values():
        assert str(tmp_path) not in row["message"]
    s = CohortStore(tmp_path / "s")
    assert s.study_keys() == [keymap["apart"]] and report.converted == 1
    assert s.channels(keymap["apart"]) == ["T1"]
    (t2,) = [r for r in s.study_attrs(keymap["apart"])["series"] if r["role"] == "T2"]
    assert t2["used"] is False and t2["overlap_fraction"] == 0.0


def test_dicom_zero_scaling_and_negative_values_are_refused(cohort, manifest, tmp_path, key_file):
    entry = manifest["studies"][0]
    cases = {"zero_slope": ("RescaleSlope", "0"), "negative": ("RescaleIntercept", "-5000"),
             "zero_spacing": ("PixelSpacing", ["0", "0"])}
    for name, (tag, value) in cases.items():
        folder = tmp_path / name
        shutil.copytree(cohort / Path(entry["series"][entry["t1_series_uid"]]["folder"]), folder / "t1")
        for f in (folder / "t1").iterdir():
            ds = pydicom.dcmread(f)
            ds.StudyInstanceUID = f"1.2.3.{len(name)}.{ord(name[0])}"
            setattr(ds, tag, value)
            ds.save_as(f)
        report = convert(folder, tmp_path / f"s-{name}", key_file=key_file, show_progress=False)
        (row,) = read_rows(tmp_path / f"s-{name}" / "failures.parquet")
        assert row["reason"] == {"zero_slope": "bad_scaling", "negative": "out_of_range_values",
                                 "zero_spacing": "bad_geometry"}[name], row
        assert report.converted == 0


def test_metaimage_never_reads_outside_its_folder(tmp_path, key_file):
    from kneebatch.ingest.metaimage import write_metaimage

    secret = tmp_path / "secret.raw"
    secret.write_bytes(np.arange(12 * 24 * 20, dtype=np.uint16).tobytes())
    src = tmp_path / "src"
    src.mkdir()
    grid = Grid.from_parts((12, 24, 20), (3.0, 0.5, 0.5), (0, 0, 0), np.array(((-1.0, 0, 0), (0, 0, -1.0),
                                                                                (0, 1.0, 0))).T)
    write_metaimage(src / "knee_T1.mha", np.random.default_rng(0).integers(1, 999, grid.shape).astype(np.uint16), grid)
    for i, target in enumerate(["../secret.raw", str(secret)]):
        header = (src / "knee_T1.mha").read_bytes().split(b"ElementDataFile")[0]
        (src / f"peek{i}_T1.mhd").write_bytes(header + f"ElementDataFile = {target}\n".encode())
    report = convert(src, tmp_path / "s", key_file=key_file, show_progress=False)
    failures = read_rows(tmp_path / "s" / "failures.parquet")
    assert report.converted == 1  # the honest one
    assert sorted(r["reason"] for r in failures) == ["unreadable_pixels", "unreadable_pixels"]
    assert all("own folder" in r["message"] for r in failures)


def test_label_names_from_headers_never_become_paths(tmp_path):
    from kneebatch.ingest.label_import import label_file

    (tmp_path / "labels").mkdir()
    outside = tmp_path / "evil.nii.gz"
    outside.write_bytes(b"x")
    assert label_file(tmp_path / "labels", ["../evil", "k0123456789"]) is None


def test_file_names_in_any_encoding_and_two_cases_with_one_name(cohort, manifest, tmp_path, key_file):
    src = tmp_path / "src"
    entry = manifest["studies"][0]
    # a study under a folder whose name is not UTF-8 (Latin-1 bytes), and a junk file named likewise
    folder = os.path.join(os.fsencode(src), b"Patient_M\xfcller")
    shutil.copytree(cohort / Path(entry["series"][entry["t1_series_uid"]]["folder"]).parent, os.fsdecode(folder))
    with open(os.path.join(folder, b"notes_\xe9t\xe9.txt"), "wb") as f:
        f.write(b"not dicom")
    good = np.random.default_rng(1).integers(10, 3000, (12, 24, 20)).astype(np.uint16)
    for site in ("siteA", "siteB"):
        (src / site).mkdir()
        _nifti(src / site / "knee01_T1.nii.gz", good)
    report = convert(src, tmp_path / "s", key_file=key_file, show_progress=False)
    assert (report.studies_found, report.converted, report.files_rejected) == (3, 3, 1)
    uids = sorted(r["study_uid"] for r in read_rows(tmp_path / "s" / "keymap.parquet") if r["study_uid"])
    assert uids == sorted([entry["study_uid"], "siteA/knee01", "siteB/knee01"])


def test_pydicom_warnings_and_header_text_stay_off_the_console(cohort, manifest, tmp_path, key_file):
    """A header value pydicom warns about (quoting it) names the patient: it reaches neither
    the console (driver and Dask workers) nor a table."""
    from pydicom import config

    entry = manifest["studies"][0]
    study = cohort / Path(entry["series"][entry["t1_series_uid"]]["folder"]).parent
    folder = tmp_path / "src"
    shutil.copytree(study, folder)
    mode = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        for f in folder.rglob("*"):
            if f.is_file():
                ds = pydicom.dcmread(f)
                ds.BodyPartExamined = "left knee of SECRETNAME"  # too long and lower case for CS
                ds.save_as(f)
    finally:
        config.settings.writing_validation_mode = mode
    for workers in ("1", "2"):
        store = tmp_path / f"s{workers}"
        done = subprocess.run([sys.executable, "-m", "kneebatch.cli", "convert", str(folder), str(store),
                               "--workers", workers, "--key-file", str(key_file)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "1 converted" in done.stdout
        assert "SECRETNAME" not in done.stdout + done.stderr and entry["study_uid"] not in done.stdout + done.stderr
        (key,) = CohortStore(store).study_keys()
        assert CohortStore(store).study_attrs(key)["knee_side"] == "left"  # the header's word, not its text
        assert "SECRETNAME" not in str(CohortStore(store).study_attrs(key))


# ---------------------------------------------------------------- issue 27: one line for every misuse
def test_a_key_file_that_is_a_folder_is_one_line(cohort, tmp_path, capsys):
    (tmp_path / "keys").mkdir()
    assert main(["convert", str(cohort / "dicom"), str(tmp_path / "s.zarr"), "-q", "--key-file",
                 str(tmp_path / "keys")]) == 2
    assert "is a folder" in _err_line(capsys)


@pytest.mark.parametrize("command", ["measure", "export"])
@pytest.mark.parametrize("choice", [["--model", "deadbeef"], ["--label-name", "trth"]], ids=["model", "label-name"])
def test_an_unknown_model_or_label_name_is_refused_and_nothing_written(store, tmp_path, capsys, command, choice):
    out = tmp_path / "out"
    assert main([command, str(store), str(out), "-q", *choice]) == 2
    line = _err_line(capsys)
    assert "no study of the store has" in line and choice[1] in line
    assert not out.exists()


def test_a_read_only_out_is_one_line(store, tiny_engines, tmp_path, capsys):
    if os.geteuid() == 0:  # root writes through a read-only mode: take a path the kernel refuses to root too
        out = Path("/sys/kneebatch-out")
        try:
            out.mkdir()
        except PermissionError:
            pass
        else:
            out.rmdir()
            pytest.skip("this machine lets root write under /sys")
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        out = tmp_path / "ro" / "out"
    assert main(["run", str(store), str(out), "-q", "--engines", str(tiny_engines), "--backend", "torch"]) == 2
    line = _err_line(capsys)
    assert "ermission denied" in line or "not permitted" in line


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_tampered_engine_is_one_line_before_anything_is_written(store, tiny_engines, tmp_path, capsys, workers):
    engines = tmp_path / "engines"
    shutil.copytree(tiny_engines, engines)
    weights = engines / "fine.onnx"
    data = bytearray(weights.read_bytes())
    data[-64] ^= 0xFF
    weights.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert main(["run", str(store), str(out), "-q", "--engines", str(engines), "--workers", workers]) == 2
    assert "fine.onnx does not match the sha256" in _err_line(capsys)
    assert not out.exists()


def _config_edited(folder: Path) -> None:
    import json

    cfg = json.loads((folder / "model_config.json").read_text())
    cfg["crop_margin_mm"] = cfg.get("crop_margin_mm", 10) + 7  # wider crops: other label maps
    (folder / "model_config.json").write_text(json.dumps(cfg))


def test_an_edited_config_is_refused_like_an_edited_engine(store, tiny_engines, tmp_path, capsys):
    engines = tmp_path / "engines"
    shutil.copytree(tiny_engines, engines)
    _config_edited(engines)
    assert main(["run", str(store), str(tmp_path / "out"), "-q", "--engines", str(engines)]) == 2
    assert "model_config.json does not match the sha256" in _err_line(capsys)


def test_a_config_without_a_recorded_hash_still_enters_the_model_hash_and_the_settings(store, tiny_engines, tmp_path):
    """Sets exported before the config's hash was recorded: an edit cannot be caught by a
    check, but it changes the model hash, and an OUT made before it refuses the rerun."""
    import json

    from kneebatch.inference.engine_dir import load_engines
    from kneebatch.jobs.run import run

    engines = tmp_path / "engines"
    shutil.copytree(tiny_engines, engines)
    manifest = json.loads((engines / "engines.json").read_text())
    del manifest["config_sha256"]
    (engines / "engines.json").write_text(json.dumps(manifest))
    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    before = load_engines(engines).model_hash
    run(work, tmp_path / "out", engines_path=engines, batch_size=6, show_progress=False)
    _config_edited(engines)
    after = load_engines(engines).model_hash
    assert before.split("+")[:2] == after.split("+")[:2] and before != after  # same weights, other config
    with pytest.raises(ValueError, match="other settings|config"):
        run(work, tmp_path / "out", engines_path=engines, batch_size=6, show_progress=False)


def test_engines_below_the_validation_floor_are_refused_unless_allowed(store, tiny_engines, tmp_path, capsys,
                                                                      monkeypatch):
    """Engines exported with a useless validation Dice (the tests' random ones record 0) are refused
    before anything is written; --allow-low-accuracy runs them."""
    import json

    import kneebatch

    monkeypatch.delenv("KNEEBATCH_ALLOW_LOW_ACCURACY")
    assert json.loads((tiny_engines / "engines.json").read_text())["fine"]["val_score"] < 0.5
    assert main(["run", str(store), str(tmp_path / "o"), "--engines", str(tiny_engines), "--workers", "1"]) == 2
    err = _err_line(capsys)
    assert "validation Dice" in err and "--allow-low-accuracy" in err and not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="below 0.5"):
        kneebatch.segment(np.ones((2, 4, 8, 8)), np.eye(4), engines=tiny_engines)
    assert main(["run", str(store), str(tmp_path / "o"), "--engines", str(tiny_engines), "--workers", "1", "-q",
                 "--allow-low-accuracy"]) == 0
