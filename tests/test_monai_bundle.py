"""MONAI bundles as engines: kneebatch run --model gives the labels MONAI's own bundle runner
(monai.bundle.run, what python -m monai.bundle run calls) gives on the NIfTI kneebatch export writes of each study."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kneebatch import labels as L
from kneebatch.ingest.store import CohortStore
from kneebatch.outputs import read_rows

CHANNELS = {"0": "background", "1": "femur", "2": "tibia"}
INFERENCE = {
    "imports": ["$import glob"],
    "bundle_root": ".",
    "output_dir": "$@bundle_root + '/eval'",
    "dataset_dir": "/nonexistent",
    "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
    "device": "$torch.device('cpu')",
    "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                    "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [1.2, 1.2, 3.0], "mode": "bilinear"},
        {"_target_": "NormalizeIntensityd", "keys": "image"},
        {"_target_": "EnsureTyped", "keys": "image"}]},
    "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
    "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                   "num_workers": 0},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 16], "sw_batch_size": 2, "overlap": 0.5},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
         "output_dtype": "$numpy.uint8", "separate_folder": False, "resample": False}]},
    "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                  "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing", "amp": True},
    "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                         "load_dict": {"model": "@network"}},
    "initialize": ["$@checkpointloader(@evaluator)"],
    "run": ["$@evaluator.run()"],
}


def write_bundle(root: Path, steps: int = 40) -> Path:
    """A bundle as the model zoo lays one out, its UNet trained for a few steps to call bright
    voxels femur and middle ones tibia (smoothed noise, z-scored)."""
    import torch
    from monai.networks.nets import UNet
    from scipy import ndimage

    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "LICENSE").write_text("test fixture\n")
    meta = {"name": "knee_tiny_bundle", "version": "0.1.0", "monai_version": "1.6.1",
            "network_data_format": {
                "inputs": {"image": {"type": "image", "format": "magnitude", "num_channels": 1,
                                     "spatial_shape": [32, 32, 16], "dtype": "float32", "channel_def": {"0": "T1"}}},
                "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 3,
                                     "spatial_shape": [32, 32, 16], "dtype": "float32", "channel_def": CHANNELS}}}}
    (root / "configs" / "metadata.json").write_text(json.dumps(meta, indent=1))
    (root / "configs" / "inference.json").write_text(json.dumps(INFERENCE, indent=1))
    torch.manual_seed(0)
    kw = {k: v for k, v in INFERENCE["network_def"].items() if k != "_target_"}
    net = UNet(**kw)
    rng = np.random.default_rng(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        x = ndimage.gaussian_filter(rng.normal(size=(2, 32, 32, 16)), (0, 2, 2, 1))
        x = (x - x.mean()) / x.std()
        y = np.where(x > 0.8, 1, np.where(x > -0.2, 2, 0))
        loss = torch.nn.functional.cross_entropy(net(torch.as_tensor(x[:, None], dtype=torch.float32)),
                                                 torch.as_tensor(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return write_bundle(tmp_path_factory.mktemp("bundle") / "knee_tiny_bundle")


def test_run_with_a_monai_bundle_gives_the_bundle_runners_labels(small_store, bundle, tmp_path, capsys):
    import nibabel as nib

    from kneebatch.cli import main

    store_path = tmp_path / "store.zarr"
    shutil.copytree(small_store, store_path)
    assert main(["run", str(store_path), str(tmp_path / "out"), "--model", str(bundle), "-q"]) == 0
    assert "2 segmented" in capsys.readouterr().out
    # the reference: the study as a user exports it, through MONAI's own bundle runner
    assert main(["export", str(store_path), str(tmp_path / "nifti"), "--images", "-q"]) == 0
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in (tmp_path / "nifti").glob("*_T1.nii.gz"):
        shutil.copy(f, inputs / f.name)
    # monai.bundle.run: what `python -m monai.bundle run` calls (its command line needs `fire`)
    runner = ("from monai.bundle import run; import sys; run(config_file=sys.argv[1], meta_file=sys.argv[2], "
              "bundle_root=sys.argv[3], dataset_dir=sys.argv[4], output_dir=sys.argv[5])")
    done = subprocess.run([sys.executable, "-c", runner, str(bundle / "configs" / "inference.json"),
                           str(bundle / "configs" / "metadata.json"), str(bundle), str(inputs), str(tmp_path / "ref")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    store = CohortStore(store_path, create=False)
    lut = np.array([0, L.by_name("femur").id, L.by_name("tibia").id], np.uint8)
    rows = {r["study_key"]: r for r in read_rows(tmp_path / "out" / "measurements.parquet")}
    for key in store.study_keys():
        reference_file = tmp_path / "ref" / f"{key}_T1_seg.nii.gz"
        reorientation, source = store.source_order(key)
        # the runner's labels, in the exported file's voxel order, brought to the store's
        ref = np.asarray(nib.load(reference_file).dataobj).astype(np.int64).transpose(2, 1, 0)
        reference = reorientation.apply(lut[ref], source)[0]
        _, ours = store.chosen_labels(key, None)
        assert ours.shape == reference.shape
        assert np.array_equal(ours, reference), (key, int((ours != reference).sum()))
        present = np.bincount(ours.ravel(), minlength=L.N_CLASSES) / ours.size
        assert present[L.by_name("femur").id] > 0.01 and present[L.by_name("tibia").id] > 0.01
        row = rows[key]
        assert row["engine_set"] == "monai_bundle:knee_tiny_bundle"
        assert row["patella_volume_mm3"] is None and row["femur_confidence"] is None
    assert not list(bundle.glob("eval*"))  # kneebatch's run wrote nothing into the bundle


def test_a_bad_bundle_is_refused_in_one_line(small_store, bundle, tmp_path, capsys):
    from kneebatch.cli import main

    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "models" / "model.pt").unlink()
    assert main(["run", str(small_store), str(tmp_path / "out"), "--model", str(broken), "-q"]) == 2
    assert "is not a MONAI bundle: no models/model.pt" in capsys.readouterr().err
    assert main(["run", str(small_store), str(tmp_path / "out"), "--model", str(bundle), "--tta", "-q"]) == 2
    assert "leave --tta out" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
