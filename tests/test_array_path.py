"""One code path for the whole per-study pipeline, on three array namespaces.

normalize, resample, box, crop, argmax, paste, volumes, thickness, laterality and QC run
through :func:`kneebatch.jobs.segment.process_batch` on NumPy, torch CPU tensors and
``array_api_strict`` (which refuses anything outside the standard), with the shipped
engines called through DLPack: the label maps and every measurement agree. On
``array_api_strict``'s second device (a stand-in GPU: it refuses to mix with host
arrays and cannot be read by NumPy) the copies across the boundary are counted: the
image goes in once, the label map and one vector of measurements come out.
"""

import dataclasses
import math
import shutil

import array_api_compat
import array_api_strict as xps
import numpy as np
import pytest

from kneebatch import ops
from kneebatch.inference.engine_dir import load_engines
from kneebatch.ingest.store import CohortStore
from kneebatch.jobs.segment import process_batch

N_STUDIES = 2

NAMESPACES = {  # namespace, device, studies per engine call
    "numpy": (np, None, 1),
    "torch": (ops.torch_namespace(), "cpu", 1),
    "array_api_strict": (xps, xps.Device("CPU_DEVICE"), 1),
    "array_api_strict-device1": (xps, xps.Device("device1"), 1),
    "array_api_strict-device1-shared-calls": (xps, xps.Device("device1"), N_STUDIES),
}


@pytest.fixture(scope="module")
def shipped():
    return load_engines(None, "torch")


@pytest.fixture(scope="module")
def runs(store, shipped, tmp_path_factory):
    """process_batch on a copy of the store per namespace: (rows by key, label maps by key, copies)."""
    out = {}
    for name, (xp, device, net_batch) in NAMESPACES.items():
        copy = tmp_path_factory.mktemp(name) / "cohort.zarr"
        shutil.copytree(store, copy)
        keys = CohortStore(copy).study_keys()[:N_STUDIES]
        ops.TRANSFERS.clear()
        result = process_batch(keys, str(copy), dataclasses.replace(shipped, net_batch=net_batch), xp=xp, device=device)
        assert not result["failures"], result["failures"]
        s = CohortStore(copy)
        labels = {k: s.read_labels(k, shipped.label_name) for k in keys}  # whole volumes
        out[name] = ({r["study_key"]: r for r in result["rows"]}, labels, dict(ops.TRANSFERS))
    return out


def _numbers(row):
    return {k: v for k, v in row.items() if isinstance(v, float)}


@pytest.mark.parametrize("name", [n for n in NAMESPACES if n != "numpy"])
def test_labels_and_measurements_agree_across_namespaces(runs, name):
    rows_ref, labels_ref, _ = runs["numpy"]
    rows, labels, _ = runs[name]
    assert len(rows) == N_STUDIES and rows.keys() == rows_ref.keys()
    for key in rows:
        a, b = labels_ref[key], labels[key]
        assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
        assert np.count_nonzero(a != b) == 0, f"{key}: {np.count_nonzero(a != b)} voxels differ"
        ref, got = _numbers(rows_ref[key]), _numbers(rows[key])
        assert ref.keys() == got.keys()
        for col, v in ref.items():
            if col.endswith(("_mm3", "_ml")) or col.startswith("spacing"):
                assert got[col] == v, col  # voxel counts x voxel volume: exactly equal
            elif math.isnan(v):
                assert math.isnan(got[col]), col
            else:
                assert got[col] == pytest.approx(v, rel=1e-9, abs=1e-9), col
        for col in ("qc_flags", "knee_side", "knee_side_source", "channels_used"):
            assert rows[key][col] == rows_ref[key][col], col


def test_the_pipeline_segments_knees(runs):
    """Not only equal, but right: the shipped engines find every bone of each study."""
    rows, _, _ = runs["numpy"]
    for row in rows.values():
        assert all(row[f"{bone}_volume_ml"] > 1.0 for bone in ("femur", "tibia", "patella"))
        assert 1.0 < row["femoral_cartilage_thickness_mean_mm"] < 4.0


@pytest.mark.parametrize("name", ["array_api_strict-device1", "array_api_strict-device1-shared-calls"])
def test_on_a_device_only_the_image_goes_in_and_labels_and_row_come_back(runs, name):
    # per study: the label map, the row's one vector, and the crop of the knee's cartilage plates
    # that the subregion rules read on the host (measure.knee_crop)
    assert runs[name][2] == {"to_device": N_STUDIES, "to_host": 3 * N_STUDIES}
    assert runs["numpy"][2] == {} and runs["torch"][2] == {}  # host namespaces: nothing crosses


def test_the_stand_in_device_refuses_a_silent_host_copy():
    x = xps.asarray([1.0, 2.0], device=xps.Device("device1"))
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        np.asarray(x)
    with pytest.raises(ValueError):
        x + xps.asarray([1.0, 2.0])
    assert not ops.on_host(x) and array_api_compat.is_array_api_strict_namespace(ops.namespace(x))


def _gpu_namespaces():
    import torch

    if not torch.cuda.is_available():
        return []
    out = [("torch-cuda", ops.torch_namespace(), "cuda")]
    try:
        import cupy

        out.append(("cupy", cupy, None))
    except ImportError:
        pass
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("name,xp,device", _gpu_namespaces() or [pytest.param(
    "gpu", None, None, marks=pytest.mark.skip(reason="needs a CUDA GPU (torch CUDA tensors; CuPy where installed)"))])
def test_on_a_gpu_labels_and_measurements_are_those_of_the_cpu(runs, store, tmp_path, name, xp, device):
    rows_ref, labels_ref, _ = runs["numpy"]
    copy = tmp_path / "cohort.zarr"
    shutil.copytree(store, copy)
    keys = CohortStore(copy).study_keys()[:N_STUDIES]
    ops.TRANSFERS.clear()
    on_gpu = load_engines(None, "torch", device="cuda")  # engines and study on the same device
    result = process_batch(keys, str(copy), on_gpu, xp=xp, device=device)
    assert not result["failures"] and dict(ops.TRANSFERS) == {"to_device": N_STUDIES, "to_host": 2 * N_STUDIES}
    s = CohortStore(copy)
    for row in result["rows"]:
        key = row["study_key"]
        labels = s.read_labels(key, on_gpu.label_name)
        # GPU kernels sum in other orders: a handful of boundary voxels may differ
        assert np.mean(labels != labels_ref[key]) < 1e-4
        assert row["femur_volume_mm3"] == pytest.approx(rows_ref[key]["femur_volume_mm3"], rel=1e-3)


def test_engines_on_another_device_than_the_study_are_refused():
    import torch

    def net_on_cpu(x):
        return torch.zeros((1, 3, 2, 2, 2))

    with pytest.raises(ValueError, match="engines run on cpu"):
        ops.call_net(net_on_cpu, torch.zeros((1, 2, 2, 2, 2), device="meta"))
