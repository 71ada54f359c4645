"""Images synthesised from label maps during training (domain randomisation).

As SynthSeg (Billot et al., MedIA 2023) does for the brain: a net that only ever sees
one appearance learns that appearance; one that sees every label at random intensities,
under random bias, noise, blur and resolution, learns shapes. Here half the images get
random intensities per label (a Gaussian mixture) and half a physical contrast drawn
from :data:`kneebatch.synth.physics.FAMILIES` (minus the ones held out for testing), so
real-looking contrasts are learnt too.

A :class:`LabelVolume` is a subject's label planes on an acquisition grid (several
planes per slice, as :func:`kneebatch.synth.render.render_labels` paints them, so the
image has the partial volume of thick slices while the truth is the slice's centre
plane). Volumes are cached as ``.npz`` (no pickle) and re-rendered with a new
:class:`Appearance` whenever the trainer asks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from kneebatch import labels as L
from kneebatch.geometry import Grid
from kneebatch.synth import physics
from kneebatch.synth.anatomy import BODY
from kneebatch.synth.render import acquire, label_lut, planes_signal, render_labels

# contrasts no training image has: accuracy on them measures generalisation (engines/TRAINING.md)
HELD_OUT_FAMILIES = ("STIR",)
TRAIN_FAMILIES = tuple(f for f in physics.FAMILIES if f not in HELD_OUT_FAMILIES)


@dataclass
class LabelVolume:
    key: str
    planes: np.ndarray  # uint8 [n_sub, Z, Y, X], BODY where no label
    cortex: np.ndarray  # bool [n_sub, Z, Y, X]
    grid: Grid

    @property
    def truth(self) -> np.ndarray:
        t = self.planes[self.planes.shape[0] // 2].copy()
        t[t == BODY] = 0
        return t

    def subsampled(self, step: int) -> LabelVolume:
        """Every ``step``-th row and column (a cheap low-resolution copy for the coarse net)."""
        if step == 1:
            return self
        a = self.grid.affine.copy()
        a[:3, 1:3] *= step
        sl = (slice(None), slice(None), slice(None, None, step), slice(None, None, step))
        grid = Grid((self.grid.shape[0], *self.planes[sl].shape[2:]), a)
        return LabelVolume(self.key, self.planes[sl], self.cortex[sl], grid)

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez_compressed(tmp, planes=self.planes, cortex=np.packbits(self.cortex), cortex_shape=self.cortex.shape,
                            affine=self.grid.affine, shape=np.array(self.grid.shape))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> LabelVolume:
        with np.load(path, allow_pickle=False) as z:
            n = int(np.prod(z["cortex_shape"]))
            cortex = np.unpackbits(z["cortex"])[:n].reshape(tuple(z["cortex_shape"])).astype(bool)
            return cls(path.stem, z["planes"], cortex, Grid(tuple(int(s) for s in z["shape"]), z["affine"]))


def subject_volume(seed: int, index: int, ranges) -> LabelVolume:
    """Label planes of synthetic subject ``index`` on its first series' grid."""
    from kneebatch.synth.cohort import _n_sub, plan_subject

    plan = plan_subject(seed, index, ranges)
    acq = plan.t1
    n = _n_sub(acq.thickness_mm, min(acq.grid.spacing[1:]))
    planes, cortex = render_labels(plan.anatomy, plan.pose, acq.grid, acq.thickness_mm, n)
    return LabelVolume(f"s{seed}-{index}", planes, cortex, acq.grid)


def cached_volumes(folder, seed: int, n: int, ranges, workers: int = 1) -> list[LabelVolume]:
    """Subjects ``0..n-1`` of ``seed``, rendered once and kept as ``folder/s<seed>-<i>.npz``."""
    from kneebatch.progress import progress_map

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(n) if not (folder / f"s{seed}-{i}.npz").exists()]
    progress_map(_render_one, [(seed, i, ranges, str(folder)) for i in todo], workers=workers,
                 description="label volumes", show=bool(todo))
    return [LabelVolume.load(folder / f"s{seed}-{i}.npz") for i in range(n)]


def _render_one(args) -> None:
    seed, index, ranges, folder = args
    subject_volume(seed, index, ranges).save(Path(folder) / f"s{seed}-{index}.npz")


def deform(vol: LabelVolume, rng: np.random.Generator, max_mm: float = 4.0, control_mm: float = 32.0) -> LabelVolume:
    """SynthSeg's non-linear deformation: a smooth random displacement (a control point every
    ``control_mm``, up to ``max_mm`` each way) applied to every label plane by nearest neighbour,
    so shapes are learnt, not memorised."""
    from scipy import ndimage

    shape = np.array(vol.grid.shape)
    spacing = np.array(vol.grid.spacing)
    n_ctrl = np.maximum(2, np.ceil(shape * spacing / control_mm).astype(int))
    coords = list(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    for axis in range(3):
        ctrl = np.clip(rng.normal(0.0, max_mm / 2, n_ctrl), -max_mm, max_mm) / spacing[axis]
        coords[axis] += ndimage.zoom(ctrl.astype(np.float32), shape / n_ctrl, order=1, mode="nearest",
                                     grid_mode=True)[: shape[0], : shape[1], : shape[2]]
    # nearest neighbour: each voxel takes the label at its displaced position (clamped to the volume)
    index = tuple(np.clip(np.rint(c), 0, n - 1).astype(np.intp) for c, n in zip(coords, shape))
    return LabelVolume(vol.key, vol.planes[(slice(None), *index)], vol.cortex[(slice(None), *index)], vol.grid)


@dataclass
class Appearance:
    """How one synthetic image looks: signal per label, and the acquisition's imperfections."""

    lut: np.ndarray  # float32 [256]: signal per label id (BODY included)
    cortex: float
    snr: float = 25.0
    bias: float = 0.15
    texture: float = 0.3
    psf_voxels: float = 0.6
    gamma: float = 1.0
    name: str = ""  # the physics family, or "random"
    extra: dict = field(default_factory=dict)


def physics_appearance(seq: physics.Sequence, rng: np.random.Generator, jitter: float = 0.1,
                       name: str = "") -> Appearance:
    table = physics.tissue_signal(seq)
    kinds = label_lut()
    per_kind = {k: v * float(rng.uniform(1 - jitter, 1 + jitter)) for k, v in table.items()}
    lut = np.zeros(256, np.float32)
    for lab, kind in kinds.items():
        lut[lab] = per_kind[kind]
    return Appearance(lut, per_kind["cortex"], name=name or seq.family)


def random_appearance(rng: np.random.Generator) -> Appearance:
    """Every label its own random intensity (SynthSeg's Gaussian mixture means)."""
    lut = np.zeros(256, np.float32)
    ids = [lab.id for lab in L.LABELS] + [BODY]
    lut[ids] = rng.uniform(0.05, 1.0, len(ids))
    if rng.random() < 0.2:  # a little signal outside the body (ghosting, wrap)
        lut[0] = rng.uniform(0.0, 0.08)
    return Appearance(lut, float(rng.uniform(0.0, 1.0)), name="random")


def draw_appearance(rng: np.random.Generator, p_random: float = 0.5, families=TRAIN_FAMILIES) -> Appearance:
    if rng.random() < p_random:
        a = random_appearance(rng)
    else:
        name = str(rng.choice(list(families)))
        a = physics_appearance(physics.draw(name, rng), rng, name=name)
    return replace(a, snr=float(rng.uniform(6, 40)), bias=float(rng.uniform(0.0, 0.4)),
                   texture=float(rng.uniform(0.1, 0.45)), psf_voxels=float(rng.uniform(0.0, 1.2)),
                   gamma=float(np.exp(rng.normal(0.0, 0.25))))


def synthesize(vol: LabelVolume, look: Appearance, rng: np.random.Generator) -> np.ndarray:
    """A float32 image ``[Z, Y, X]`` of ``vol`` as ``look`` says (scale arbitrary: nets see z-scores)."""
    signal = planes_signal(vol.planes, vol.cortex, look.lut, look.cortex)
    image = acquire(signal, vol.grid, rng, look.snr, look.bias, look.texture, look.psf_voxels, snr_of_mean=True)
    if look.gamma != 1.0:
        top = float(np.percentile(image[:: 7, :: 7, :: 7], 99.5)) or 1.0
        image = np.power(np.clip(image / top, 0, None), look.gamma) * top
    return image.astype(np.float32)
