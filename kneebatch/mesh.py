"""3-D reconstruction: a surface per tissue from a label map, in patient millimetres (LPS),
written as GLB (glTF 2.0, what viewers and the report's three.js load) and drawn as a PNG.

Marching cubes (scikit-image) runs on each label's bounding box; Taubin smoothing takes
the voxel terraces off without shrinking the surface (a plain Laplacian would thin the
cartilage)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from kneebatch import labels as L
from kneebatch.geometry import Grid

THIN = ("cartilage", "meniscus", "ligament", "tendon", "fluid")  # a blur would thin them away: meshed as they are
HIDDEN_IN_STILL = ("muscle", "fat")  # they wrap the joint: the GLB has them, the still shows the joint


@dataclass
class TissueMesh:
    label: L.Label
    vertices: np.ndarray  # (N, 3) LPS mm
    faces: np.ndarray  # (M, 3), counter-clockwise seen from outside

    @property
    def volume_mm3(self) -> float:
        """The enclosed volume (divergence theorem): a check on orientation and scale."""
        v = self.vertices[self.faces]
        return float(np.einsum("ij,ij->i", v[:, 0], np.cross(v[:, 1], v[:, 2])).sum() / 6.0)


def tissue_meshes(labels: np.ndarray, grid: Grid, step: int = 2, smooth: int = 10,
                  names: list[str] | None = None, blur: float = 0.6, bulky_step: int | None = None) -> list[TissueMesh]:
    """A closed surface per label present (or per one of ``names``). ``step``: marching-cubes
    step in voxels (2 halves the faces' count per axis); ``smooth``: Taubin iterations;
    ``blur``: Gaussian sigma on the mask, in voxels; ``bulky_step``: another step for the
    bulky tissues (bones, muscles, fat), whose surfaces hold most triangles."""
    import trimesh
    from skimage.measure import marching_cubes

    wanted = [L.by_name(n) for n in names] if names else list(L.LABELS)
    boxes = ndimage.find_objects(labels.astype(np.int32), max_label=L.N_CLASSES - 1)
    out = []
    thin_step = step
    for label in wanted:
        step = thin_step
        box = boxes[label.id - 1] if label.id - 1 < len(boxes) else None
        if box is None:
            continue
        # one voxel of background around the box, so each surface closes
        lo = [max(s.start - 1, 0) for s in box]
        hi = [min(s.stop + 1, n) for s, n in zip(box, labels.shape)]
        step = step if label.group in THIN or bulky_step is None else bulky_step
        # background padding of a full step: the coarse sampling must see outside the tissue
        mask = np.pad(labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] == label.id, step).astype(np.float32)
        if mask.sum() < 8:
            continue
        # thick 2-D slices: interpolate the mask linearly between them (a shape-based inbetween)
        # so the surface slopes from slice to slice instead of stepping
        zoom = np.maximum(np.round(np.asarray(grid.spacing) / min(grid.spacing)), 1)
        if zoom.max() > 1:
            mask = ndimage.zoom(mask, zoom, order=1, grid_mode=True, mode="nearest")
        if blur and label.group not in THIN:  # the voxel terraces off the bulky tissues
            mask = ndimage.gaussian_filter(mask, blur * zoom)
        try:
            verts, faces, _, _ = marching_cubes(mask, 0.5, step_size=step)
        except (RuntimeError, ValueError):  # too thin to find a surface at this step
            continue
        # back to the label map's voxel indices (z, y, x); grid_mode zoom keeps voxel centres' edges aligned
        index = (verts + 0.5) / zoom - 0.5 - step + np.asarray(lo)
        lps = index @ grid.affine[:3, :3].T + grid.affine[:3, 3]
        mesh = trimesh.Trimesh(lps, faces[:, ::-1], process=True)
        if smooth:
            trimesh.smoothing.filter_taubin(mesh, iterations=smooth)
        if mesh.volume < 0:  # an affine with a mirror turns the faces inside out
            mesh.invert()
        out.append(TissueMesh(label, np.asarray(mesh.vertices), np.asarray(mesh.faces)))
    return out


def _rgba(color: str, alpha: float = 1.0) -> list[float]:
    return [int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)] + [alpha]


def glb_bytes(meshes: list[TissueMesh]) -> bytes:
    """The meshes as one glTF binary, a node per tissue named by its label, in the label's
    colour (soft tissues a little transparent, so bones show through)."""
    import trimesh

    scene = trimesh.Scene()
    for m in meshes:
        solid = m.label.group in ("bone", "cartilage", "meniscus", "ligament", "tendon")
        material = trimesh.visual.material.PBRMaterial(
            name=m.label.name, baseColorFactor=_rgba(m.label.color, 1.0 if solid else 0.45), metallicFactor=0.0,
            roughnessFactor=0.8, alphaMode="OPAQUE" if solid else "BLEND", doubleSided=not solid)
        mesh = trimesh.Trimesh(m.vertices, m.faces, process=False)
        mesh.visual = trimesh.visual.TextureVisuals(material=material)
        scene.add_geometry(mesh, node_name=m.label.name, geom_name=m.label.name)
    return scene.export(file_type="glb")


def render_png(meshes: list[TissueMesh], path: Path, max_faces: int = 60_000, title: str = "") -> Path:
    """A still of the meshes from the front-medial side (matplotlib; faces subsampled past
    ``max_faces`` per tissue, which a still does not show)."""
    from matplotlib.figure import Figure  # no pyplot: no backend chosen for the process
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    fig = Figure(figsize=(6, 6))
    ax = fig.add_subplot(projection="3d")
    light = np.array([0.4, -0.6, 0.7]) / np.linalg.norm([0.4, -0.6, 0.7])
    allv = []
    for m in meshes:
        if m.label.group in HIDDEN_IN_STILL:
            continue
        faces = m.faces[:: max(1, len(m.faces) // max_faces)]
        tri = m.vertices[faces]
        normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-12
        shade = 0.35 + 0.65 * np.clip(normal @ light, 0, 1)
        rgba = np.array(_rgba(m.label.color))
        colours = np.c_[rgba[None, :3] * shade[:, None], np.full(len(tri), rgba[3])]
        ax.add_collection3d(Poly3DCollection(tri, facecolors=colours, linewidths=0))
        allv.append(m.vertices)
    if allv:
        v = np.concatenate(allv)
        centre, half = (v.max(0) + v.min(0)) / 2, (v.max(0) - v.min(0)).max() / 2
        for set_lim, c in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), centre):
            set_lim(c - half, c + half)
    ax.view_init(elev=10, azim=-60)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def mesh_study(store_path, key: str, out, label_name: str | None = None, step: int = 2, smooth: int = 10,
               tissues: list[str] | None = None) -> dict:
    """``kneebatch mesh``: ``OUT/<key>.glb`` and ``OUT/<key>.png`` of a study's label map
    (its newest segmentation, or ``label_name``)."""
    from kneebatch.ingest.store import CohortStore

    store = CohortStore(store_path, create=False)
    if not store.has_study(key):
        raise ValueError(f"no study {key} in {store.path} (study keys: kneebatch status, or measurements.parquet)")
    name, labels = store.chosen_labels(key, label_name)
    if labels is None:
        raise ValueError(f"study {key} has no label map{f' named {name}' if name else ''}: run or import one first")
    meshes = tissue_meshes(labels, store.grid(key), step=step, smooth=smooth, names=tissues)
    from kneebatch.outputs import claim_output_dir

    out = claim_output_dir(out, "mesh", {})  # never a folder of the user's own files
    glb = out / f"{key}.glb"
    glb.write_bytes(glb_bytes(meshes))
    png = render_png(meshes, out / f"{key}.png", title=f"{key} · {name}")
    return {"glb": glb, "png": png, "tissues": [m.label.name for m in meshes],
            "faces": int(sum(len(m.faces) for m in meshes)), "label_name": name}
