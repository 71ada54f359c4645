"""An ONNX network with a JSON spec as an engine: kneebatch run --model gives the labels its
framework source gives (the same MONAI UNet in torch, through the same pipeline), measures only
what it segments, and refuses a bad spec in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from kneebatch import labels as L
from kneebatch.inference.onnx_model import OnnxModel
from kneebatch.ingest.store import CohortStore
from kneebatch.models.onnx_export import export_onnx
from kneebatch.outputs import read_rows
from tests.nnunet_model import _train

SPEC = {"kind": "onnx", "onnx": "model.onnx", "input_roles": ["T1"], "labels": {"background": 0, "femur": 1, "tibia": 2},
        "spacing_mm": [3.5, 1.0, 1.0], "patch_size": [16, 32, 32], "overlap": 0.25, "normalisation": "zscore"}


@pytest.fixture(scope="module")
def network():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)
    _train(net, 60, seed=3)
    return net.eval()


@pytest.fixture(scope="module")
def onnx_folder(tmp_path_factory, network):
    folder = tmp_path_factory.mktemp("onnx") / "knee-onnx"
    folder.mkdir()
    export_onnx(network, folder / "model.onnx", (1, 1, 16, 32, 32))
    (folder / "model.json").write_text(json.dumps(SPEC))
    return folder


@pytest.mark.parametrize("tta", [False, True])
def test_run_with_an_onnx_model_gives_its_torch_sources_labels(small_store, onnx_folder, network, tmp_path, tta,
                                                                capsys):
    from kneebatch.cli import main

    store_path = tmp_path / "store.zarr"
    shutil.copytree(small_store, store_path)
    assert main(["run", str(store_path), str(tmp_path / "out"), "--model", str(onnx_folder), "--workers", "0", "-q",
                 *(["--tta"] if tta else [])]) == 0
    assert "2 segmented" in capsys.readouterr().out
    store = CohortStore(store_path, create=False)
    source = OnnxModel.open(onnx_folder, tta=tta)
    source.network = network  # the same pipeline with the torch module the ONNX file was exported from
    rows = {r["study_key"]: r for r in read_rows(tmp_path / "out" / "measurements.parquet")}
    for key in store.study_keys():
        image, grid = store.read_image(key, [store.channels(key).index("T1")])
        reference = source.segment(image, grid)
        name, ours = store.chosen_labels(key, None)
        assert np.mean(ours == reference) > 0.9999, key  # ONNX Runtime and torch differ only at near-ties
        present = np.bincount(ours.ravel(), minlength=L.N_CLASSES) / ours.size
        assert present[L.by_name("femur").id] > 0.01 and present[L.by_name("tibia").id] > 0.01
        row = rows[key]
        assert row["engine_set"] == "onnx:knee-onnx" and row["label_name"] == name and name.endswith("-tta") == tta
        assert row["patella_volume_mm3"] is None and row["tibia_volume_mm3"] > 0


def test_a_bad_onnx_spec_is_refused_in_one_line(small_store, onnx_folder, tmp_path, capsys):
    from kneebatch.cli import main

    for broken, said in ((dict(SPEC, normalisation="minmax"), "normalisation 'minmax'"),
                         ({k: v for k, v in SPEC.items() if k != "patch_size"}, "missing: patch_size"),
                         (dict(SPEC, onnx="other.onnx"), "no other.onnx"),
                         (dict(SPEC, input_roles=["MRI"]), "--channels 0:ROLE")):
        folder = tmp_path / f"m{len(said)}"
        shutil.copytree(onnx_folder, folder)
        (folder / "model.json").write_text(json.dumps(broken))
        assert main(["run", str(small_store), str(tmp_path / "never"), "--model", str(folder)]) != 0
        err = capsys.readouterr().err.strip()
        assert said in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "never").exists()
