"""The segmentation pipeline's mechanics with small, randomly initialised engines
(accuracy of the shipped engines is tested in test_accuracy.py)."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kneebatch.inference.engine_dir import load_engines
from kneebatch.inference.engines import EngineHashMismatch
from kneebatch.inference.segment import channel_argmax, upsample_argmax
from kneebatch.ingest.store import CohortStore
from kneebatch.jobs.run import run
from kneebatch.models.preprocess import box_from_mask, normalize, resize, working_shape
from kneebatch.outputs import read_rows
from tests.conftest import comparable


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("out_shape", [(13, 20, 17), (6, 20, 17), (4, 5, 6)])
@pytest.mark.parametrize("cropped", [False, True])
def test_upsample_argmax_matches_interpolate_then_argmax(smooth, out_shape, cropped, monkeypatch):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 6, 7, 9, generator=g)
    if smooth:  # large regions of one label, as in real logits: the shortcut path
        logits = F.interpolate(torch.randn(1, 5, 2, 2, 3, generator=g), size=(6, 7, 9), mode="trilinear")[0]
    if cropped:  # a view into a padded network output, as fine_logits returns it
        padded = torch.randn(5, 8, 12, 16, generator=g)
        padded[:, :6, :7, :9] = logits
        logits = padded[:, :6, :7, :9]
    ref = F.interpolate(logits[None], size=out_shape, mode="trilinear", align_corners=False)[0].argmax(0)
    import kneebatch.inference.segment as seg

    monkeypatch.setattr(seg, "BOUNDARY_CHUNK", 50)  # several chunks of boundary voxels
    got = upsample_argmax(logits, out_shape)
    assert got.dtype == torch.uint8 and tuple(got.shape) == out_shape
    assert torch.equal(got, ref.to(torch.uint8))


def test_channel_argmax_is_argmax_with_first_maximum_on_ties():
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 3, (7, 4, 5, 6), generator=g).float()  # many ties
    assert torch.equal(channel_argmax(x), x.argmax(0).to(torch.uint8))


def test_fine_input_is_padded_with_replicated_edges_not_zeros():
    # zero bands at the crop's far ends cost the MCL (next to the last sagittal slices)
    # Dice 0.09 against 0.80 with replicated edges on a held-out 25-slice study
    import kneebatch.inference.segment as seg
    from kneebatch.models.config import ModelConfig, NetConfig
    from kneebatch.models.preprocess import pad_to_multiple

    cfg = ModelConfig(fine=NetConfig([4, 8, 8], [[1, 2, 2], [2, 2, 2]], norm="BATCH"))
    seen = []
    engine = lambda x: seen.append(x.clone()) or torch.zeros(1, cfg.n_classes, *x.shape[2:])  # noqa: E731
    x = torch.randn(2, 13, 50, 37) + 5.0
    seg.fine_logits(engine, x, cfg)
    (padded,) = seen
    assert tuple(padded.shape[2:]) == (14, 52, 40)
    assert torch.equal(padded[0, :, 13, :50, :37], x[:, 12])  # the last slice, once more
    assert torch.equal(padded[0, :, :13, :50, :37], x)
    assert torch.equal(padded[0, :, :13, 51, :37], x[:, :, 49, :]) and torch.equal(padded[0, :, :13, :50, 39], x[:, :, :, 36])
    zeros, _ = pad_to_multiple(x, (2, 4, 4))
    assert float(zeros[:, 13].abs().max()) == 0.0  # the default stays zero padding


def test_working_grid_keeps_thick_slices_and_resamples_fine_axes():
    # 3.6 mm slices stay as they are; 0.5 mm in-plane goes to 0.7 mm; 1.1 mm slices go to 2.0 mm
    assert working_shape((30, 256, 256), (3.6, 0.5, 0.5), (2.0, 0.7, 0.7)) == (30, 183, 183)
    assert working_shape((100, 300, 200), (1.1, 0.7, 0.9), (2.0, 0.7, 0.7)) == (55, 300, 200)
    # resampled axes snap to the nearest multiple of the net's divisor (no stride padding);
    # kept axes (thick slices, coarse in-plane) stay as acquired
    assert working_shape((30, 256, 256), (3.6, 0.5, 0.5), (2.0, 0.8, 0.8), (4, 16, 16)) == (30, 160, 160)
    assert working_shape((30, 292, 230), (3.6, 0.4, 0.45), (2.0, 0.8, 0.8), (4, 16, 16)) == (30, 144, 128)
    assert working_shape((101, 300, 20), (1.1, 0.9, 0.3), (2.0, 0.8, 0.8), (4, 16, 16)) == (56, 300, 16)


@pytest.mark.parametrize("norm,whole", [("BATCH", True), ("INSTANCE", False)])
def test_fine_logits_whole_crop_or_windows(norm, whole, monkeypatch):
    import kneebatch.inference.segment as seg
    from kneebatch.models.config import ModelConfig, NetConfig, build_network

    cfg = ModelConfig(fine=NetConfig([4, 8, 8], [[1, 2, 2], [2, 2, 2]], norm=norm), fine_patch=[8, 32, 32])
    assert cfg.fine_whole_crop is whole
    net = build_network(cfg.fine, 2, cfg.n_classes).eval()
    calls = []
    engine = lambda x: calls.append(tuple(x.shape[2:])) or net(x)  # noqa: E731
    x = torch.randn(2, 13, 50, 37)
    out = seg.fine_logits(engine, x, cfg)
    assert tuple(out.shape) == (cfg.n_classes, 13, 50, 37)
    if whole:  # one call on the crop padded to the net's stride (2, 4, 4)
        assert calls == [(14, 52, 40)]
        monkeypatch.setattr(seg, "WHOLE_CROP_VOXELS", 10_000)  # a crop too large for one call
        calls.clear()
        assert tuple(seg.fine_logits(engine, x, cfg).shape) == (cfg.n_classes, 13, 50, 37)
        assert len(calls) > 1 and all(a * b * c <= 10_000 and b % 4 == 0 and c % 4 == 0 for a, b, c in calls)
    else:  # windows of the training patch
        assert len(calls) > 1 and set(calls) == {(8, 32, 32)}


def test_normalize_is_a_z_score_over_the_body():
    g = torch.Generator().manual_seed(0)
    image = torch.zeros(2, 20, 64, 64)
    image[:, :, 16:48, 8:56] = torch.rand(2, 20, 32, 48, generator=g) * torch.tensor([300.0, 80.0])[:, None, None, None] + 100
    out = normalize(image.to(torch.int32).to(torch.uint16))
    body = image[0] > 0
    for c in range(2):
        vals = out[c][body]
        assert abs(float(vals.mean())) < 0.02 and abs(float(vals.std()) - 1) < 0.02
        assert float(out[c][~body].max()) < -1.0  # air far below the body


def test_resize_keeps_the_box():
    lab = torch.zeros(8, 8, 8, dtype=torch.uint8)
    lab[2:6, 4:8, 0:2] = 3
    up = resize(lab, (16, 16, 16), labels=True)
    assert torch.equal(resize(up, (8, 8, 8), labels=True), lab)
    assert int((up == 3).sum()) == 8 * int((lab == 3).sum())


def test_box_from_mask_scales_and_pads():
    mask = torch.zeros(10, 10, 10, dtype=torch.bool)
    mask[2:4, 5:6, 0:10] = True
    box = box_from_mask(mask, (20, 100, 50), (2.0, 0.5, 1.0), margin_mm=2.0)
    assert box == (slice(3, 9), slice(46, 64), slice(0, 50))
    assert box_from_mask(torch.zeros(4, 4, 4, dtype=torch.bool), (5, 6, 7), (1, 1, 1), 3.0) == (
        slice(0, 5), slice(0, 6), slice(0, 7))


def test_onnxruntime_and_torch_engines_agree(tiny_engines):
    ort_e = load_engines(tiny_engines, "onnxruntime")
    torch_e = load_engines(tiny_engines, "torch")
    x = torch.randn(2, 2, 8, 32, 32)  # a batch of 2 and another shape than exported: dynamic axes
    assert torch.allclose(ort_e.fine(x), torch_e.fine(x), atol=1e-3)
    manifest = json.loads((tiny_engines / "engines.json").read_text())
    assert ort_e.hashes["fine"] == manifest["fine"]["sha256"]["fine.onnx"]
    assert torch_e.hashes["fine"] == manifest["fine"]["sha256"]["fine.safetensors"]


def test_engine_files_are_checked_against_their_hashes(tiny_engines, tmp_path):
    bad = tmp_path / "engines"
    shutil.copytree(tiny_engines, bad)
    data = bytearray((bad / "fine.onnx").read_bytes())
    data[-100] ^= 0xFF
    (bad / "fine.onnx").write_bytes(bytes(data))
    with pytest.raises(EngineHashMismatch, match="fine.onnx"):
        load_engines(bad, "onnxruntime")
    manifest = json.loads((bad / "engines.json").read_text())
    assert set(manifest["fine"]["sha256"]) == {"fine.safetensors", "fine.onnx"}


def test_run_writes_labels_rows_and_resumes(store, tiny_engines, tmp_path):
    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    s = CohortStore(work)
    keys = s.study_keys()
    r1 = run(work, tmp_path / "out", engines_path=tiny_engines, batch_size=4, show_progress=False)
    assert (r1.studies, r1.segmented, r1.failed, r1.already_done) == (6, 6, 0, 0)
    rows = read_rows(tmp_path / "out" / "measurements.parquet")
    assert sorted(r["study_key"] for r in rows) == keys
    for k in keys:
        labels = s.read_labels(k)
        assert labels is not None and labels.shape == s.grid(k).shape and labels.dtype == np.uint8
    row = rows[0]
    assert row["label_source"] == "segmentation" and len(row["model_hash"]) == 34  # coarse+fine+config
    assert len(list((tmp_path / "out" / "parts").glob("part-*.failures.arrow"))) == 2  # 2 batches
    prov = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert prov["backend"] == "onnxruntime" and (prov["studies"], prov["rows"], prov["failed"]) == (6, 6, 0)
    assert prov["half_precision"] is False and prov["mirror_tta"] is False
    assert prov["outputs"]["measurements.parquet"]["rows"] == 6 and prov["parts"] == 2
    # a re-run recomputes nothing and yields the same table
    r2 = run(work, tmp_path / "out", engines_path=tiny_engines, batch_size=4, show_progress=False)
    assert (r2.segmented, r2.already_done) == (0, 6)
    assert comparable(read_rows(tmp_path / "out" / "measurements.parquet")) == comparable(rows)


def test_a_study_failing_while_measured_becomes_a_failure_row(store, tiny_engines, tmp_path, monkeypatch):
    # saving and measuring run on a second thread beside the next study's segmentation:
    # an error there is still that study's failure row, and the other studies go on
    import kneebatch.jobs.segment as run_module
    from kneebatch.inference.engine_dir import load_engines

    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    keys = CohortStore(work).study_keys()
    real = run_module.measure_study

    def measure_or_fail(key, *args, **kwargs):
        if key == keys[1]:
            raise ValueError("measurement exploded")
        return real(key, *args, **kwargs)

    monkeypatch.setattr(run_module, "measure_study", measure_or_fail)
    out = run_module.process_batch(keys[:4], str(work), load_engines(tiny_engines, "onnxruntime", threads=1))
    assert [r["study_key"] for r in out["rows"]] == [keys[0], keys[2], keys[3]]
    assert [(f["study_key"], f["reason"]) for f in out["failures"]] == [(keys[1], "internal_error")]
    # the exception's own text may name files: only its type reaches the row
    assert out["failures"][0]["message"] == "ValueError (details withheld: they may name files)"


def test_a_study_whose_sides_could_not_be_told_is_flagged(store, tiny_engines, tmp_path, monkeypatch):
    import kneebatch.inference.segment as segment_module
    from kneebatch.inference.engine_dir import load_engines
    from kneebatch.jobs.segment import process_batch

    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    keys = CohortStore(work).study_keys()[:2]
    engines = load_engines(tiny_engines, "onnxruntime", threads=1)
    for found in (True, False):
        monkeypatch.setattr(segment_module, "keep_sides", lambda *a, found=found: found)
        rows = process_batch(keys, str(work), engines)["rows"]
        assert len(rows) == 2
        assert all(("sides_unresolved" in r["qc_flags"]) is not found for r in rows)
        assert all(not r["qc_ok"] for r in rows if not found)
    engines.config.keep_sides = False  # switched off: not flagged either
    rows = process_batch(keys, str(work), engines)["rows"]
    assert not any("sides_unresolved" in r["qc_flags"] for r in rows)


def test_export_nifti_aligned_with_the_source(store, tiny_engines, tmp_path, key_file):
    import nibabel as nib

    from kneebatch.export import export_nifti
    from kneebatch.geometry import affine_from_nifti

    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    s = CohortStore(work)
    keys = s.study_keys()
    s.write_labels(keys[0], (np.arange(np.prod(s.grid(keys[0]).shape)) % 21).reshape(s.grid(keys[0]).shape),
                   name="labels-aaaa-bbbb")
    n, missing, used = export_nifti(work, tmp_path / "nifti", show_progress=False)
    assert (n, len(missing), used) == (1, 5, ["labels-aaaa-bbbb"])
    img = nib.load(tmp_path / "nifti" / f"{keys[0]}_labels.nii.gz")
    assert np.allclose(affine_from_nifti(img.affine), s.grid(keys[0]).affine, atol=1e-4)
    assert np.array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), s.read_labels(keys[0]))
    assert img.header.get_data_dtype() == np.uint8
    slicer = (tmp_path / "nifti" / "kneebatch_labels.ctbl").read_text().splitlines()
    assert len(slicer) == 22 and slicer[-1] == "20 effusion 0 191 255 255"
    itk = (tmp_path / "nifti" / "kneebatch_labels_itksnap.txt").read_text()
    assert '"femoral_cartilage"' in itk


def test_torch_and_onnxruntime_pipelines_give_the_same_labels(store, tiny_engines, tmp_path):
    from kneebatch.inference.segment import segment

    s = CohortStore(store)
    key = s.study_keys()[0]
    image, grid = s.read_image(key)
    image = image.astype(np.float32)
    labels = {}
    for backend in ("onnxruntime", "torch"):
        e = load_engines(tiny_engines, backend)
        labels[backend], info = segment(torch.from_numpy(image), grid, e.coarse, e.fine, e.config)
        assert tuple(labels[backend].shape) == grid.shape and set(info.seconds) == {"normalize", "coarse", "fine", "paste"}
    agree = (labels["onnxruntime"] == labels["torch"]).float().mean()
    assert agree > 0.999


def test_mirror_tta_makes_the_fine_logits_mirror_symmetric(tiny_engines):
    from kneebatch.inference.segment import fine_logits

    engines = load_engines(tiny_engines, "torch")
    x = torch.randn(2, 9, 32, 48)  # z is not a multiple of the stride: padded, then cut
    plain = fine_logits(engines.fine, x, engines.config)
    assert not torch.allclose(fine_logits(engines.fine, x.flip(1), engines.config).flip(1), plain, atol=1e-3)
    engines.config.mirror_tta = True
    tta = fine_logits(engines.fine, x, engines.config)
    assert torch.allclose(fine_logits(engines.fine, x.flip(1), engines.config).flip(1), tta, atol=1e-5)
    assert tta.shape == plain.shape and not torch.allclose(tta, plain, atol=1e-3)
    assert load_engines(tiny_engines, "torch", tta=True).config.mirror_tta


@pytest.mark.parametrize("shape", [(7, 33, 20), (40, 64, 64), (12, 90, 15)])
def test_array_api_resize_and_padding_equal_torch_interpolate_and_pad(shape):
    """The array-API resampling is torch's trilinear (align_corners=False) and nearest-exact,
    and its padding torch's: pinned to the library the engines were first trained with."""
    import torch.nn.functional as F

    from kneebatch.models.preprocess import pad_to_multiple, resize

    g = torch.Generator().manual_seed(sum(shape))
    x = torch.rand((2, 19, 47, 31), generator=g)
    want = F.interpolate(x[None], size=shape, mode="trilinear", align_corners=False)[0]
    assert torch.allclose(resize(x, shape), want, rtol=0, atol=1e-5)
    assert np.allclose(resize(x.numpy(), shape), want.numpy(), rtol=0, atol=1e-5)
    labels = torch.randint(0, 21, (19, 47, 31), generator=g, dtype=torch.uint8)
    nearest = F.interpolate(labels[None, None].float(), size=shape, mode="nearest-exact")[0, 0].to(torch.uint8)
    assert torch.equal(resize(labels, shape, labels=True), nearest)
    assert np.array_equal(resize(labels.numpy(), shape, labels=True), nearest.numpy())
    padded, before = pad_to_multiple(x, (4, 16, 16), mode="replicate")
    assert before == (19, 47, 31) and tuple(padded.shape[1:]) == (20, 48, 32)
    assert torch.equal(padded, F.pad(x[None], [0, 1, 0, 1, 0, 1], mode="replicate")[0])
    assert torch.equal(pad_to_multiple(x, (4, 16, 16))[0], F.pad(x, [0, 1, 0, 1, 0, 1]))


def test_stacked_calls_put_same_shapes_together_up_to_the_limit_in_order():
    import kneebatch.inference.segment as seg

    calls = []

    class Net:
        max_batch = None

        def __call__(self, x):
            calls.append(tuple(x.shape))
            return x * 2

    net = Net()
    a = [torch.full((1, 2, 3, 4), float(i)) for i in range(4)]
    b = torch.ones((1, 5, 3, 4))
    inputs = [a[0], a[1], b, a[2], a[3]]
    out = seg.stacked_calls(net, inputs, limit=3)
    assert calls == [(3, 1, 2, 3, 4), (1, 1, 2, 3, 4), (1, 1, 5, 3, 4)]
    assert all(torch.equal(got, x * 2) for got, x in zip(out, inputs))
    calls.clear()
    net.max_batch = 2  # an engine's own limit (TensorRT's optimization profile) wins
    seg.stacked_calls(net, inputs, limit=8)
    assert calls == [(2, 1, 2, 3, 4), (2, 1, 2, 3, 4), (1, 1, 5, 3, 4)]


def test_studies_sharing_engine_calls_get_the_labels_they_get_alone(store, tiny_engines, tmp_path):
    """net_batch 3 over 4 studies: two coarse calls instead of four, the same label maps, the same
    rows; and a study that breaks the net inside a shared group fails alone, with a reason."""
    import dataclasses

    from kneebatch.jobs.segment import process_batch

    engines = load_engines(tiny_engines, "torch")
    keys = CohortStore(store).study_keys()[:4]
    results, coarse_calls = {}, {}
    for per_call in (1, 3):
        copy = tmp_path / f"b{per_call}.zarr"
        shutil.copytree(store, copy)
        counted = dataclasses.replace(engines, net_batch=per_call)
        calls = []
        counted.coarse = lambda x, net=engines.coarse, calls=calls: calls.append(x.shape[0]) or net(x)
        r = process_batch(keys, str(copy), counted)
        assert not r["failures"] and len(r["rows"]) == 4
        s = CohortStore(copy)
        results[per_call] = ({row["study_key"]: row for row in r["rows"]},
                             {k: s.read_labels(k, engines.label_name) for k in keys})
        coarse_calls[per_call] = calls
    assert coarse_calls == {1: [1, 1, 1, 1], 3: [3, 1]}
    for key in keys:
        assert np.array_equal(results[1][1][key], results[3][1][key])
        assert results[1][0][key]["femur_volume_mm3"] == results[3][0][key]["femur_volume_mm3"]

    # a study whose fine crop breaks the net, in a shared group: it alone fails, with its reason
    shapes = []
    spy = dataclasses.replace(engines, net_batch=1)
    spy.fine = _Watched(engines.fine, lambda x: shapes.append(tuple(x.shape[2:])))
    copy = tmp_path / "shapes.zarr"
    shutil.copytree(store, copy)
    process_batch(keys, str(copy), spy)
    culprit = next(i for i, shape in enumerate(shapes) if shapes.count(shape) == 1)
    assert len(set(shapes)) < 4, "the test needs crops that share a call"

    def breaks_on_the_culprit(x):
        if tuple(x.shape[2:]) == shapes[culprit]:
            raise RuntimeError("out of memory")

    broken = dataclasses.replace(engines, net_batch=4)
    broken.fine = _Watched(engines.fine, breaks_on_the_culprit)
    copy = tmp_path / "broken.zarr"
    shutil.copytree(store, copy)
    r = process_batch(keys, str(copy), broken)
    assert [f["study_key"] for f in r["failures"]] == [keys[culprit]]
    assert r["failures"][0]["reason"] == "internal_error"
    assert sorted(row["study_key"] for row in r["rows"]) == sorted(k for k in keys if k != keys[culprit])
    for row in r["rows"]:
        assert row["femur_volume_mm3"] == results[1][0][row["study_key"]]["femur_volume_mm3"]


class _Watched:
    """An engine that lets ``before(x)`` see (or refuse) each input first."""

    def __init__(self, engine, before):
        self.engine, self.before, self.device = engine, before, engine.device

    def __call__(self, x):
        self.before(x)
        return self.engine(x)


def _requests(name, work_after, log):
    """A stand-in study for drive(): one net request, then ``work_after`` seconds of its own work."""
    import time

    from kneebatch.inference.segment import _Clock

    def steps(info):
        clock = _Clock(info)
        clock.stage_is("own")
        outs = yield "net", [torch.full((1, 2), float(name))]
        time.sleep(work_after)
        clock.stage_is(None)
        log.append(name)
        return float(outs[0].sum())

    return steps


def test_drive_charges_each_study_its_own_time_and_its_share_of_the_call():
    import time

    import kneebatch.inference.segment as seg

    def slow_net(x):
        time.sleep(0.1)
        return x * 10

    log = []
    infos = [seg.SegmentInfo() for _ in range(3)]
    steps = [_requests(i, w, log)(info) for i, (w, info) in enumerate(zip((0.3, 0.0, 0.1), infos))]
    out = seg.drive(steps, {"net": slow_net}, infos, limit=3)
    assert out == [0.0, 20.0, 40.0] and log == [0, 1, 2]
    own = [info.seconds["own"] for info in infos]
    # lower bounds only (a slow machine may add, never remove, time): each study is charged its own
    # sleep, and a third of the one shared 0.1 s call
    assert own[0] >= 0.3 and own[2] >= 0.1 and own[0] > own[2] > own[1]
    nets = [info.seconds["net"] for info in infos]
    assert min(nets) >= 0.033 and max(nets) == pytest.approx(min(nets))  # one call, shared in equal thirds


def test_drive_retries_a_failed_shared_call_one_input_at_a_time():
    import kneebatch.inference.segment as seg

    def one_at_a_time(x):  # e.g. memory for one crop, not for four
        if x.shape[0] > 1:
            raise RuntimeError("out of memory")
        if float(x[0, 0, 0]) == 1.0:
            raise ValueError("this study breaks the net")
        return x * 10

    infos = [seg.SegmentInfo() for _ in range(3)]
    steps = [_requests(i, 0.0, [])(info) for i, info in enumerate(infos)]
    out = seg.drive(steps, {"net": one_at_a_time}, infos, limit=4)
    assert out[0] == 0.0 and out[2] == 40.0 and isinstance(out[1], ValueError)
