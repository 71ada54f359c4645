import array_api_strict as xps
import numpy as np
import pytest
import torch

from kneebatch import labels as L
from kneebatch import ops
from kneebatch.inference.laterality import FORBIDDEN, keep_sides, left_right_axis
from kneebatch.inference.segment import channel_argmax

ID = {label.name: label.id for label in L.LABELS}


def _as(ns, arr):
    return {"numpy": lambda a: a, "torch": torch.from_numpy, "array_api_strict": xps.asarray}[ns](arr)


@pytest.mark.parametrize("ns", ["numpy", "torch", "array_api_strict"])
def test_largest_component_keeps_the_biggest_face_connected_piece(ns):
    mask = np.zeros((6, 8, 8), bool)
    mask[0:3, 0:3, 0:3] = True  # 27 voxels
    mask[4:6, 5:8, 5:8] = True  # 18 voxels
    mask[3, 3, 3] = True  # touches the first block only at a corner: its own piece
    got = np.asarray(ops.to_numpy(ops.largest_component(_as(ns, mask))))
    want = np.zeros_like(mask)
    want[0:3, 0:3, 0:3] = True
    assert np.array_equal(got, want)
    assert not np.asarray(ops.to_numpy(ops.largest_component(_as(ns, np.zeros_like(mask))))).any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with CuPy")
def test_largest_component_on_the_gpu_matches_the_cpu():
    rng = np.random.default_rng(3)
    mask = rng.random((20, 30, 30)) < 0.4
    got = ops.largest_component(torch.from_numpy(mask).cuda())
    assert got.is_cuda
    assert np.array_equal(got.cpu().numpy(), ops.largest_component(mask))


def test_left_right_axis_follows_the_grid_direction():
    sagittal = np.array([[-1.0, 0, 0], [0, 0, 1], [0, -1, 0]]).T  # columns: z, y, x axes in LPS
    assert left_right_axis(sagittal) == 0
    axial_like = np.array([[0, 0, 1.0], [0, 1, 0], [0.97, 0, 0.26]]).T
    assert left_right_axis(axial_like) == 2


def _knee(lateral_high: bool):
    """A 40-slice crop, 2 mm slices: notch at slice 20, fibula 15 slices (30 mm) to the lateral side."""
    lab = np.zeros((40, 12, 12), np.uint8)
    lab[:, 8:, :] = ID["tibia"]
    lab[18:23, 4:8, 4:8] = ID["acl"]
    lat, med = (lambda z: 39 - z, lambda z: z) if lateral_high else (lambda z: z, lambda z: 39 - z)
    for z in range(3, 9):
        lab[lat(z), 9:, 2:6] = ID["fibula"]
    for z in range(8, 16):
        lab[lat(z), 7, 2:10] = ID["lateral_meniscus"]
        lab[med(z), 7, 2:10] = ID["medial_meniscus"]
    lab[med(10), 9:11, 2:4] = ID["fibula"]  # a stray fibula on the medial side
    lab[lat(1), 1:3, 1:3] = ID["fibula"]  # and one on the lateral side, apart from the bone
    truth = lab.copy()
    truth[med(10), 9:11, 2:4] = ID["tibia"]
    truth[lat(1), 1:3, 1:3] = 0
    wrong = (med(12), med(13))  # the net's mistake: medial meniscus slices called lateral
    for z in wrong:
        lab[z, 7, 2:10] = ID["lateral_meniscus"]
    # logits: the net's label first, the truth (its counterpart) a close runner-up
    logits = np.zeros((L.N_CLASSES, *lab.shape), np.float32)
    np.put_along_axis(logits, truth[None].astype(np.int64), 4.0, axis=0)
    np.put_along_axis(logits, lab[None].astype(np.int64), 5.0, axis=0)
    return torch.from_numpy(logits), truth


@pytest.mark.parametrize("ns", ["numpy", "torch", "array_api_strict"])
@pytest.mark.parametrize("lateral_high", [False, True])
def test_side_labels_move_to_their_own_side(lateral_high, ns):
    logits, truth = _knee(lateral_high)
    before = channel_argmax(logits).numpy()
    assert (before != truth).sum() == 2 * 8 + 4 + 4  # two meniscus rows, two stray fibula pieces
    # as the fine net gives them: over a crop padded at the end of each axis (the padding ignored)
    padded = np.pad(logits.numpy(), [(0, 0), (0, 3), (0, 2), (0, 1)], mode="edge")
    moved = _as(ns, padded)
    assert keep_sides(moved, truth.shape, axis=0, spacing_mm=2.0)
    got = np.asarray(ops.to_numpy(channel_argmax(moved)))[:truth.shape[0], :truth.shape[1], :truth.shape[2]]
    assert np.array_equal(got, truth)
    assert keep_sides(logits, tuple(logits.shape[1:]), axis=0, spacing_mm=2.0)
    # the kept fibula's own logits are untouched, so its interpolated boundary is too
    fib = truth == ID["fibula"]
    assert torch.all(logits[ID["fibula"]][torch.from_numpy(fib)] == 5.0)


def test_a_crop_without_a_telling_fibula_is_left_alone():
    logits, truth = _knee(lateral_high=False)
    no_fibula = logits.clone()
    no_fibula[ID["fibula"]] = -1.0
    kept = no_fibula.clone()
    assert not keep_sides(no_fibula, tuple(no_fibula.shape[1:]), axis=0, spacing_mm=2.0)
    assert torch.equal(no_fibula, kept)
    # at 0.5 mm slices the same fibula lies 7.5 mm from the notch: too close to tell
    kept = logits.clone()
    assert not keep_sides(logits, tuple(logits.shape[1:]), axis=0, spacing_mm=0.5)
    assert torch.equal(logits, kept)
    assert FORBIDDEN > torch.finfo(torch.float16).min  # masked logits stay finite in float16
