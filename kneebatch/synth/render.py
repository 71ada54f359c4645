"""Turn a phantom (:mod:`.anatomy`) into MR images on an acquisition grid.

Partial volume comes from evaluating the anatomy on several planes inside each
slice's thickness and averaging the signal; the ground-truth label is the one at
the slice's centre plane, as a rater would draw it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from kneebatch.geometry import Grid
from kneebatch.synth.anatomy import AIR, BODY, Anatomy, structures

# Relative signal per tissue: T1-weighted TSE and fat-suppressed T2-weighted TSE.
# Fluid dark on T1 / bright on T2, fat bright on T1 (suppressed on T2 FS), cortex,
# menisci, ligaments and tendons dark on both, cartilage intermediate.
CONTRAST = {
    "T1": {
        "air": 0.0, "body": 0.82, "fat": 0.90, "marrow": 0.78, "cortex": 0.04, "cartilage": 0.42,
        "meniscus": 0.05, "ligament": 0.09, "tendon": 0.06, "muscle": 0.33, "fluid": 0.14,
    },
    "T2": {
        "air": 0.0, "body": 0.14, "fat": 0.11, "marrow": 0.16, "cortex": 0.03, "cartilage": 0.40,
        "meniscus": 0.05, "ligament": 0.08, "tendon": 0.05, "muscle": 0.25, "fluid": 0.95,
    },
    "PD": {  # fat-suppressed proton density, used for the extra axial series
        "air": 0.0, "body": 0.15, "fat": 0.13, "marrow": 0.18, "cortex": 0.03, "cartilage": 0.55,
        "meniscus": 0.06, "ligament": 0.1, "tendon": 0.06, "muscle": 0.32, "fluid": 0.75,
    },
    # 3-D DESS with water excitation (OAI): fat and marrow dark, cartilage bright against them,
    # fluid brightest (the second echo is T2-weighted), menisci and ligaments dark
    "DESS": {
        "air": 0.0, "body": 0.10, "fat": 0.07, "marrow": 0.09, "cortex": 0.02, "cartilage": 0.62,
        "meniscus": 0.05, "ligament": 0.07, "tendon": 0.04, "muscle": 0.22, "fluid": 0.90,
    },
}
CONTRAST["PDFS"] = CONTRAST["PD"]  # the OAI's sagittal intermediate-weighted TSE with fat suppression


@dataclass
class Pose:
    """Canonical knee frame -> patient LPS: ``p = t + R @ (scale * (mirror @ q))``."""

    rotation: np.ndarray  # 3x3
    scale: np.ndarray  # (3,)
    translation: np.ndarray  # (3,) mm, LPS
    side: str  # "RIGHT" or "LEFT"

    def world_to_canonical(self) -> np.ndarray:
        """4x4 matrix taking LPS points to canonical ones."""
        mirror = np.diag([1.0 if self.side == "RIGHT" else -1.0, 1.0, 1.0])
        # canonical +x is medial: the patient's left (+L) for a right knee
        lin = mirror @ np.diag(1.0 / np.asarray(self.scale)) @ np.asarray(self.rotation).T
        m = np.eye(4)
        m[:3, :3] = lin
        m[:3, 3] = -lin @ np.asarray(self.translation)
        return m


def label_lut() -> dict[int, str]:
    """Label id -> tissue kind used in :data:`CONTRAST`."""
    from kneebatch import labels as L

    kind = {"bone": "marrow", "cartilage": "cartilage", "meniscus": "meniscus", "ligament": "ligament",
            "tendon": "tendon", "muscle": "muscle", "fat": "fat", "fluid": "fluid"}
    out = {0: "air", BODY: "body"}
    out.update({label.id: kind[label.group] for label in L.LABELS})
    return out


def render_labels(anatomy: Anatomy, pose: Pose, grid: Grid, thickness_mm: float, n_sub: int):
    """Paint the anatomy on ``n_sub`` planes per slice.

    Returns ``(labels [n_sub, Z, Y, X] uint8, cortex [n_sub, Z, Y, X] bool)``;
    plane ``n_sub // 2`` is the slice centre.
    """
    w2c = pose.world_to_canonical()
    normal = grid.direction[:, 0]
    shape = grid.shape
    labels = np.zeros((n_sub, *shape), np.uint8)
    cortex = np.zeros((n_sub, *shape), bool)
    structs = structures(anatomy)
    for k in range(n_sub):
        offset = ((k + 0.5) / n_sub - 0.5) * thickness_mm
        idx_to_world = grid.affine.copy()
        idx_to_world[:3, 3] += normal * offset
        m = w2c @ idx_to_world  # voxel index -> canonical
        inv = np.linalg.inv(m)
        for s in structs:
            block = _index_block(inv, s.bbox, shape)
            if block is None:
                continue
            x, y, z = _canonical_coords(m, block)
            target = labels[(k, *block)]
            painted = s.paint(x, y, z)
            if s.sdf:
                target[painted < 0] = s.label
                cortex[(k, *block)] |= (painted < 0) & (painted > -anatomy.cortex_mm)
            elif painted.dtype == bool:
                target[painted] = s.label
            else:
                target[painted > 0] = painted[painted > 0]
        labels[k][labels[k] == AIR] = 0
    return labels, cortex


def _index_block(canon_to_idx: np.ndarray, bbox, shape):
    lo, hi = np.asarray(bbox[0], float), np.asarray(bbox[1], float)
    corners = np.array([[(lo, hi)[i][0], (lo, hi)[j][1], (lo, hi)[k][2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    idx = corners @ canon_to_idx[:3, :3].T + canon_to_idx[:3, 3]
    start = np.maximum(np.floor(idx.min(0)).astype(int), 0)
    stop = np.minimum(np.ceil(idx.max(0)).astype(int) + 1, shape)
    if np.any(stop <= start):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def _canonical_coords(m: np.ndarray, block):
    iz, iy, ix = (np.arange(b.start, b.stop, dtype=np.float32) for b in block)
    iz, iy, ix = iz[:, None, None], iy[None, :, None], ix[None, None, :]
    m = m.astype(np.float32)
    return tuple(m[r, 0] * iz + m[r, 1] * iy + m[r, 2] * ix + m[r, 3] for r in range(3))


def render_image(labels_sub, cortex_sub, grid: Grid, contrast, rng: np.random.Generator,
                 tissue_jitter: dict, snr: float, bias_strength: float, max_value: int = 4095) -> np.ndarray:
    """Signal from label planes: contrast, partial volume, texture, bias field, Rician noise.

    ``contrast``: a name in :data:`CONTRAST` (``snr`` is the brightest tissue's) or a table
    ``{tissue kind: signal}`` (e.g. :func:`kneebatch.synth.physics.tissue_signal`; ``snr`` is the
    mean tissue's, as a scanner's SNR is quoted, so dark contrasts are not drowned in noise)."""
    table = CONTRAST[contrast] if isinstance(contrast, str) else contrast
    kinds = label_lut()
    lut = np.zeros(256, np.float32)
    for lab, kind in kinds.items():
        lut[lab] = table[kind] * tissue_jitter.get(kind, 1.0)
    cortex_value = table["cortex"] * tissue_jitter.get("cortex", 1.0)
    signal = planes_signal(labels_sub, cortex_sub, lut, cortex_value)
    image = acquire(signal, grid, rng, snr, bias_strength, snr_of_mean=not isinstance(contrast, str))
    return np.clip(np.rint(image * 0.8 * max_value), 0, max_value).astype(np.uint16)


def planes_signal(labels_sub, cortex_sub, lut: np.ndarray, cortex_value: float) -> np.ndarray:
    """Mean signal over a slice's planes (partial volume): ``lut[label]``, cortex where marked."""
    signal = np.zeros(labels_sub.shape[1:], np.float32)
    for k in range(labels_sub.shape[0]):
        plane = lut[labels_sub[k]]
        plane[cortex_sub[k]] = cortex_value
        signal += plane
    signal /= labels_sub.shape[0]
    return signal


def acquire(signal: np.ndarray, grid: Grid, rng: np.random.Generator, snr: float, bias_strength: float,
            texture_strength: float = 0.35, psf_voxels: float = 0.6, snr_of_mean: bool = False) -> np.ndarray:
    """Tissue texture, in-plane point spread, coil bias and Rician noise on a noise-free signal.

    The noise's standard deviation is ``1 / snr`` of the brightest tissue's signal (0.9-0.95), or
    with ``snr_of_mean`` of the mean signal inside the body."""
    body = signal > 0
    reference = float(signal[body].mean()) if snr_of_mean and body.any() else 1.0
    texture = ndimage.gaussian_filter(rng.standard_normal(signal.shape).astype(np.float32), (0.7, 1.5, 1.5))
    signal = signal * (1.0 + texture_strength * texture * body)
    if psf_voxels > 0:
        signal = ndimage.gaussian_filter(signal, (0.0, psf_voxels, psf_voxels))
    signal *= _bias_field(grid, rng, bias_strength)
    sigma = reference / snr
    n1 = rng.normal(0.0, sigma, signal.shape).astype(np.float32)
    n2 = rng.normal(0.0, sigma, signal.shape).astype(np.float32)
    return np.sqrt((signal + n1) ** 2 + n2 ** 2)


def _bias_field(grid: Grid, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Smooth multiplicative coil sensitivity: a random quadratic in patient space."""
    z, y, x = (np.arange(n, dtype=np.float32) for n in grid.shape)
    centre = (np.asarray(grid.shape) - 1) / 2.0
    span = np.asarray(grid.shape, np.float32) * np.asarray(grid.spacing, np.float32)
    coords = [
        ((z - centre[0]) * grid.spacing[0] / (span[0] / 2 + 1e-3))[:, None, None],
        ((y - centre[1]) * grid.spacing[1] / (span[1] / 2))[None, :, None],
        ((x - centre[2]) * grid.spacing[2] / (span[2] / 2))[None, None, :],
    ]
    lin = rng.uniform(-1, 1, 3) * strength
    quad = rng.uniform(-1, 1, 3) * strength * 0.5
    log_b = sum(lin[i] * coords[i] + quad[i] * coords[i] ** 2 for i in range(3))
    return np.exp(log_b).astype(np.float32)
