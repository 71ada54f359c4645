"""Coarse-to-fine segmentation of one study (the paper's method), on any array namespace.

read (uint16 [2,Z,Y,X]) -> normalize -> coarse net on the whole field of view at a
fixed small shape -> bounding box of the coarse foreground (+ margin) -> crop at full
resolution -> resize axes finer than the fine working spacing -> fine net (whole crop
in one call) -> medial/lateral labels kept on their side (:mod:`.laterality`) ->
argmax of the logits trilinearly resampled to the native crop (interpolated only at
tissue boundaries) -> paste into the full volume.

Written once against the array API (:mod:`kneebatch.ops`): NumPy, torch on the CPU or
a GPU, CuPy. Everything stays on the image's device; the nets take and give arrays
through DLPack (:func:`kneebatch.ops.call_net`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from kneebatch import ops
from kneebatch.geometry import Grid
from kneebatch.inference.laterality import keep_sides, left_right_axis
from kneebatch.models.config import ModelConfig
from kneebatch.models.preprocess import box_from_mask, fine_crop, linear_taps, normalize, pad_to_multiple, resize

BOUNDARY_CHUNK = 250_000  # boundary voxels interpolated at a time (x n_classes x 4 bytes per corner)
WHOLE_CROP_VOXELS = 6_000_000  # working voxels run in one call; larger crops go in windows of this size


@dataclass
class SegmentInfo:
    box: tuple = ()
    working_shape: tuple = ()
    sides_found: bool | None = None  # medial/lateral rule applied (None: switched off)
    confidence: object = None  # per label: the nets' mean probability of it where they chose it (:func:`confidence`)
    seconds: dict = field(default_factory=dict)
    suspended: float = 0.0  # seconds spent waiting for other studies' and the nets' work (:func:`drive`)


channel_argmax = ops.channel_argmax


def confidence(logits, valid=None):
    """Per label (``[K]``, float64): the mean softmax probability of the winning label over the
    working voxels it wins, NaN where it wins none. Engines that know a knee are sure of most of
    each tissue; on an image unlike their training they are not, and a tissue they then
    under-segment has a low mean where its size alone can still look like a small real one.
    One channel at a time: no ``K x`` copy of the logits."""
    xp = ops.namespace(logits)
    valid = tuple(int(s) for s in (valid or logits.shape[1:]))
    x = logits[:, :valid[0], :valid[1], :valid[2]]
    top = xp.astype(xp.max(x, axis=0), xp.float64)  # float64: every namespace gives the same means
    total = xp.zeros(top.shape, dtype=xp.float64, device=ops.device_of(x))
    for k in range(x.shape[0]):
        total += xp.exp(xp.astype(x[k, ...], xp.float64) - top)
    return ops.label_means(ops.channel_argmax(x), 1.0 / total, int(x.shape[0]))


def upsample_argmax(logits, out_shape, valid=None):
    """argmax of ``logits [K, z, y, x]`` trilinearly resampled onto ``out_shape`` over the same box.

    ``valid``: the logits' own extent when ``logits`` is the net's padded output (the valid
    part at the start of each axis), which is then indexed in place instead of copied.
    Exact without resampling all K channels everywhere: a trilinear value is a convex
    combination of its 8 source voxels, so where those share one argmax, so does the
    interpolated vector. Only output voxels whose sources disagree (tissue boundaries,
    ~10 % of a knee) have their K logits interpolated.
    """
    xp = ops.namespace(logits)
    dev = ops.device_of(logits)
    out_shape = tuple(int(s) for s in out_shape)
    valid = tuple(int(s) for s in (valid or logits.shape[1:]))
    work = ops.channel_argmax(logits[:, :valid[0], :valid[1], :valid[2]])
    if valid == out_shape:
        return work
    taps = [linear_taps(n, w, xp, dev) for n, w in zip(out_shape, valid)]
    # a working voxel is "uniform" when its forward neighbourhood (2 along each resampled
    # axis; kept axes, e.g. native slices, have weight 0 on the next voxel) has one label
    moved = [a for a in range(3) if out_shape[a] != valid[a]]
    top, bottom = work, work
    for a in moved:
        # each voxel against its next neighbour along a (the last one against itself)
        top, bottom = xp.maximum(top, ops.shift(top, a, -1)), xp.minimum(bottom, ops.shift(bottom, a, -1))

    def at_corner0(v):  # v[i0z][:, i0y][:, :, i0x]: one gather per axis
        for axis in range(3):
            v = xp.take(v, taps[axis][0], axis=axis)
        return v

    out = xp.reshape(at_corner0(work), (-1,))
    todo_mask = xp.reshape(at_corner0(top != bottom), (-1,))
    todo = xp.nonzero(todo_mask)[0]
    if todo.shape[0] == 0:
        return xp.reshape(out, out_shape)
    padded = logits.shape[1:]
    flat = xp.reshape(logits, (logits.shape[0], -1))  # the padded buffer's own rows: no copy
    strides = (padded[1] * padded[2], padded[2], 1)
    ny, nx = out_shape[1:]
    found = []
    for c0 in range(0, todo.shape[0], BOUNDARY_CHUNK):
        idx = todo[c0:min(c0 + BOUNDARY_CHUNK, todo.shape[0])]
        coords = (idx // (ny * nx), (idx // nx) % ny, idx % nx)
        lo = [xp.take(taps[a][0], coords[a]) for a in range(3)]
        base = lo[0] * strides[0] + lo[1] * strides[1] + lo[2]
        step = [(xp.take(taps[a][1], coords[a]) - lo[a]) * strides[a] for a in moved]
        frac = [xp.take(taps[a][2], coords[a]) for a in moved]
        acc = None
        for corner in range(2 ** len(moved)):
            src, weight = base, None
            for j in range(len(moved)):
                upper = (corner >> j) & 1
                src = src + step[j] if upper else src
                w = frac[j] if upper else 1 - frac[j]
                weight = w if weight is None else weight * w
            term = xp.take(flat, src, axis=1) * weight
            acc = term if acc is None else acc + term
        found.append(ops.channel_argmax(acc))
    out[todo_mask] = xp.concat(found) if len(found) > 1 else found[0]
    return xp.reshape(out, out_shape)


def stacked_calls(net, inputs: list, limit: int = 1) -> list:
    """``net`` on each ``[C, ...]`` array of ``inputs``, outputs ``[K, ...]`` in the same order.

    Inputs of one shape go through the net together, up to ``limit`` per call (and the
    engine's own ``max_batch``): several studies' coarse volumes, one bucket's fine crops, a
    crop and its mirror image. A GPU runs a batch of small inputs in about the time of one.
    The outputs are views of the batch's output (kept alive until every one is dropped)."""
    limit = max(1, min(limit, getattr(net, "max_batch", None) or limit))
    out = [None] * len(inputs)
    by_shape: dict[tuple, list[int]] = {}
    for i, x in enumerate(inputs):
        by_shape.setdefault(tuple(x.shape), []).append(i)
    for members in by_shape.values():
        for s in range(0, len(members), limit):
            part = members[s:s + limit]
            xp = ops.namespace(inputs[part[0]])
            batch = inputs[part[0]][None, ...] if len(part) == 1 else xp.stack([inputs[i] for i in part])
            y = ops.call_net(net, batch)
            for j, i in enumerate(part):
                out[i] = y[j, ...]
    return out


def drive(steps: list, nets: dict, infos: list, limit: int = 1) -> list:
    """Run generators of net requests (one per study) side by side; returns what each returned,
    or the exception that stopped it (one study's failure never stops the others).

    A generator yields ``(stage, inputs)`` and is sent the net's outputs for ``inputs``;
    the requests of every study waiting at the same stage go through :func:`stacked_calls`
    together, up to ``limit`` inputs a call. If that fails, each study's inputs run again
    one per call, as the study would alone: only the one that broke the call fails. Each
    study's ``info.seconds[stage]`` gets its share of the call's time; ``info.suspended``
    counts the time it waited, which its own clock leaves out."""
    results: list = [None] * len(steps)
    waiting: dict[int, tuple] = {}
    since: dict[int, float] = {}

    def advance(i, outs):
        if outs is not None:
            infos[i].suspended += time.perf_counter() - since[i]
        try:
            waiting[i] = steps[i].send(outs)
            since[i] = time.perf_counter()
        except StopIteration as done:
            results[i] = done.value
        except Exception as e:  # noqa: BLE001 - the study's failure, reported as its row
            results[i] = e

    def call(net, inputs, cap):
        outs = stacked_calls(net, inputs, cap)
        if outs:
            ops.synchronize(outs[0])  # a device error of the call surfaces here, not in a later study
        return outs

    for i in range(len(steps)):
        advance(i, None)
    while waiting:
        round_, waiting = waiting, {}
        for stage in dict.fromkeys(stage for stage, _ in round_.values()):
            who = [i for i, (s, _) in round_.items() if s == stage]
            t = time.perf_counter()
            try:
                outs = call(nets[stage], [x for i in who for x in round_[i][1]], limit)
            except Exception:  # noqa: BLE001 - retried per study below
                outs = None
            if outs is not None:
                share, k = (time.perf_counter() - t) / len(who), 0
                for i in who:
                    n = len(round_[i][1])
                    infos[i].seconds[stage] = infos[i].seconds.get(stage, 0.0) + share
                    advance(i, outs[k:k + n])
                    k += n
                continue
            for i in who:
                t = time.perf_counter()
                try:
                    own = call(nets[stage], round_[i][1], 1)
                except Exception as e:  # noqa: BLE001 - the study's failure, reported as its row
                    results[i] = e
                    steps[i].close()
                    continue
                infos[i].seconds[stage] = infos[i].seconds.get(stage, 0.0) + time.perf_counter() - t
                advance(i, own)
    return results


def _alone(steps, net, info=None):
    """A generator of ``net``'s requests run by itself (one input per call); its return value."""
    result = drive([steps], {"fine": net}, [info or SegmentInfo()])[0]
    if isinstance(result, Exception):
        raise result
    return result


class _Clock:
    """A study's own time per stage: wall time less what it spent waiting in :func:`drive`."""

    def __init__(self, info: SegmentInfo):
        self.info, self.stage = info, None
        self.t, self.waited = time.perf_counter(), info.suspended

    def stage_is(self, stage: str | None, sync=None) -> None:
        if sync is not None:
            ops.synchronize(sync)
        now, waited = time.perf_counter(), self.info.suspended
        if self.stage is not None:
            own = now - self.t - (waited - self.waited)
            self.info.seconds[self.stage] = self.info.seconds.get(self.stage, 0.0) + own
        self.stage, self.t, self.waited = stage, now, waited


def fine_steps(fine, crops: list, cfg: ModelConfig):
    """Fine-net logits for working-grid crops ``[C, z, y, x]``, as a generator of net requests
    (:func:`drive`); returns ``[(padded logits, shape)]``: the logits ``[K, ...]`` over each crop
    padded to the net's stride, ``shape`` the crop's own extent at the start of each axis (the
    padding is left in place so the logits are not copied).

    A batch-norm net runs on the whole crop in one call; only crops above
    ``WHOLE_CROP_VOXELS`` are split, into large windows with little overlap. An
    instance-norm net runs on windows of its training patch size, as nnU-Net does, so that
    its normalisation sees the context it was trained with. With ``cfg.mirror_tta`` the
    logits are averaged with those of the crop mirrored along z (the slice axis,
    left-right in a sagittal study: the mirroring the net was trained with), as nnU-Net
    does; crop and mirror image go in one request."""
    xp = ops.namespace(crops[0])
    copies = 2 if cfg.mirror_tta else 1
    padded, shapes = [], []
    for x in crops:
        for v in ([x, xp.flip(x, axis=1)] if cfg.mirror_tta else [x]):
            p, shape = _padded(fine, v, cfg)
            padded.append(p)
        shapes.append(shape)
    whole = [cfg.fine_whole_crop and math.prod(p.shape[1:]) <= WHOLE_CROP_VOXELS for p in padded]
    outs = (yield "fine", [p for p, w in zip(padded, whole) if w]) if any(whole) else []
    outs = iter(outs)
    logits = [next(outs) if w else _windowed_logits(fine, p, cfg) for p, w in zip(padded, whole)]
    results = []
    for i, shape in enumerate(shapes):
        if not cfg.mirror_tta:
            results.append((logits[i], shape))
            continue
        plain, mirrored = logits[copies * i], logits[copies * i + 1]
        crop = (slice(None), slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
        results.append(((plain[crop] + xp.flip(mirrored[crop], axis=1)) * 0.5, shape))
    return results


@torch.inference_mode()
def padded_fine_logits(fine, x, cfg: ModelConfig):
    """``(logits, shape)`` for one working-grid crop ``x [C, z, y, x]`` (:func:`fine_steps`)."""
    return _alone(fine_steps(fine, [x], cfg), fine)[0]


def fine_logits(fine, x, cfg: ModelConfig):
    """Fine-net logits ``[K, z, y, x]`` for a working-grid crop ``x [C, z, y, x]`` (a view of
    :func:`padded_fine_logits`)."""
    logits, shape = padded_fine_logits(fine, x, cfg)
    return logits[:, :shape[0], :shape[1], :shape[2]]


def _padded(fine, x, cfg: ModelConfig):
    """``x`` padded to the net's stride, and to the engine's static bucket if it has them."""
    # replicated edges, not zeros: a band of z-score 0 (mean tissue) at the crop's far
    # ends is nothing the net saw in training, and its context reaches far into the knee
    xpad, shape = pad_to_multiple(x, cfg.fine.divisor(), mode="replicate")
    if hasattr(fine, "input_shape"):  # compiled engines with static shapes: up to a bucket
        xpad, _ = pad_to_multiple(xpad, fine.input_shape(xpad.shape[1:], cfg.fine.divisor()), mode="replicate")
    return xpad, shape


def _windowed_logits(fine, xpad, cfg: ModelConfig):
    """Logits over ``xpad`` by windows: large ones for a crop too large for one call, the
    training patch for an instance-norm net."""
    if cfg.fine_whole_crop:
        patch, overlap = _large_window(xpad.shape[1:], cfg.fine.divisor()), 0.1
    else:
        patch, overlap = tuple(cfg.fine_patch), cfg.sw_overlap
    from monai.inferers import sliding_window_inference  # imported only here: it costs seconds

    if any(s < p for s, p in zip(xpad.shape[1:], patch)):  # smaller than a window: pad up to one
        xpad, _ = pad_to_multiple(xpad, patch, mode="replicate")

    def windows(t):  # MONAI works on torch tensors: the crop goes by DLPack, on its device
        return sliding_window_inference(t, patch, sw_batch_size=1 if cfg.fine_whole_crop else 2,
                                        predictor=fine, overlap=overlap)

    return ops.call_net(windows, xpad[None, ...])[0, ...]


def _large_window(shape, divisor) -> tuple[int, int, int]:
    """A window of at most ``WHOLE_CROP_VOXELS``: the crop halved along its longest axes until it fits."""
    win = list(shape)
    while win[0] * win[1] * win[2] > WHOLE_CROP_VOXELS:
        a = max(range(3), key=lambda i: win[i] / divisor[i])
        win[a] = max(divisor[a], int(math.ceil(win[a] / 2 / divisor[a]) * divisor[a]))
    return tuple(win)


def series_inputs(x, cfg: ModelConfig) -> list:
    """What a net is run on for ``x [C, ...]``: ``x`` itself, or for one-channel nets trained on
    every contrast (``cfg.per_series``) each series alone: one model, any number of series."""
    if not cfg.per_series or x.shape[0] == 1:
        return [x]
    return [x[c:c + 1, ...] for c in range(x.shape[0])]


def series_combine(outs: list, covered=None):
    """The mean of the nets' outputs over the series of :func:`series_inputs`.

    ``covered [C, ...]`` (0-1, on the outputs' grid): where each series has data. A series
    resampled onto the study grid is zero outside its own field of view; there it does not vote."""
    if len(outs) == 1:
        return outs[0]
    if covered is None:
        total = outs[0]
        for out in outs[1:]:
            total = total + out
        return total / len(outs)
    xp = ops.namespace(outs[0])
    total, weight = None, None
    for c, out in enumerate(outs):
        # a small floor: where no series has data (outside every field of view) the plain mean
        w = xp.astype(covered[c, ...], out.dtype) * (1 - 1e-3) + 1e-3
        total = out * w if total is None else total + out * w
        weight = w if weight is None else weight + w
    return total / weight


def series_mean(net, x, cfg: ModelConfig, covered=None):
    """``net`` on ``x [C, ...]`` as :func:`series_inputs` and :func:`series_combine` put it."""
    return series_combine([net(v) for v in series_inputs(x, cfg)], covered)


@torch.inference_mode()
def segment(image, grid: Grid, coarse, fine, cfg: ModelConfig):
    """Label map (uint8, in ``image``'s namespace and on its device) on the study grid."""
    info = SegmentInfo()
    return paste(fine_stage(image, grid, coarse, fine, cfg, info), info), info


@dataclass
class FineResult:
    """The fine net's logits on the working grid, and where they go on the study grid."""

    logits: object  # [K, ...] over the padded working crop
    valid: tuple  # the working crop's extent within ``logits``
    box: tuple
    crop_shape: tuple
    native_shape: tuple
    left_right: tuple | None = None  # (axis, working spacing mm) when side labels are kept on their side


@torch.inference_mode()
def fine_stage(image, grid: Grid, coarse, fine, cfg: ModelConfig, info: SegmentInfo) -> FineResult:
    """normalize -> coarse -> box -> crop -> fine logits (the engines' part of ``segment``).

    ``image [C, Z, Y, X]`` float32, of any namespace; everything stays on its device."""
    result = fine_stages([image], [grid], coarse, fine, cfg, [info])[0]
    if isinstance(result, Exception):
        raise result
    return result


@torch.inference_mode()
def fine_stages(images: list, grids: list, coarse, fine, cfg: ModelConfig, infos: list, limit: int = 1) -> list:
    """:func:`fine_stage` for several studies, their net inputs of one shape up to ``limit``
    per engine call; a study that fails is its exception in the returned list."""
    steps = [_study_steps(image, grid, fine, cfg, info) for image, grid, info in zip(images, grids, infos)]
    return drive(steps, {"coarse": coarse, "fine": fine}, infos, limit)


def _study_steps(image, grid: Grid, fine, cfg: ModelConfig, info: SegmentInfo):
    """One study's :func:`fine_stage` as a generator of net requests (:func:`drive`)."""
    xp = ops.namespace(image)
    clock = _Clock(info)
    clock.stage_is("normalize")
    # one-channel engines over several series: where each series has data (zero outside its field of view)
    covered = xp.astype(image > 0, xp.float32) if cfg.per_series and image.shape[0] > 1 else None
    x = normalize(image)
    native = tuple(x.shape[1:])

    clock.stage_is("coarse", sync=x)
    xc, _ = pad_to_multiple(resize(x, cfg.coarse_shape), cfg.coarse.divisor())
    cc = None if covered is None else pad_to_multiple(resize(covered, cfg.coarse_shape), cfg.coarse.divisor())[0]
    outs = yield "coarse", series_inputs(xc, cfg)
    coarse_labels = ops.channel_argmax(series_combine(outs, cc))
    box = box_from_mask(coarse_labels > 0, native, grid.spacing, cfg.crop_margin_mm)

    clock.stage_is("fine", sync=x)
    crop, _ = fine_crop(x, box, grid.spacing, cfg)
    pieces = series_inputs(crop, cfg)
    found = yield from fine_steps(fine, pieces, cfg)
    if len(pieces) == 1:
        logits, valid = found[0]
    else:
        crop_covered = None if covered is None else fine_crop(covered, box, grid.spacing, cfg)[0]
        logits = series_combine([out[:, :s[0], :s[1], :s[2]] for out, s in found], crop_covered)
        valid = tuple(crop.shape[1:])
    crop_shape, wshape = tuple(b.stop - b.start for b in box), tuple(crop.shape[1:])
    clock.stage_is(None, sync=x)
    info.box, info.working_shape = box, wshape
    left_right = None
    if cfg.keep_sides:
        axis = left_right_axis(grid.direction)
        left_right = axis, crop_shape[axis] * grid.spacing[axis] / wshape[axis]
    return FineResult(logits, valid, box, crop_shape, native, left_right)


@torch.inference_mode()
def paste(result: FineResult, info: SegmentInfo):
    """The label map on the study grid: logits resampled to the crop, argmax, pasted."""
    xp = ops.namespace(result.logits)
    t = time.perf_counter()
    if result.left_right is not None:
        info.sides_found = keep_sides(result.logits, result.valid, *result.left_right)
    labels = xp.zeros(result.native_shape, dtype=xp.uint8, device=ops.device_of(result.logits))
    labels[result.box] = upsample_argmax(result.logits, result.crop_shape, result.valid)
    info.confidence = confidence(result.logits, result.valid)
    ops.synchronize(labels)
    info.seconds["paste"] = time.perf_counter() - t
    return labels
