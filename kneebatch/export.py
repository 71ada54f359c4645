"""``kneebatch export``: label maps from the store as NIfTI, with colour tables for viewers."""

from __future__ import annotations

from pathlib import Path

from kneebatch import labels as L
from kneebatch.ingest.nifti import write_label_nifti
from kneebatch.ingest.store import CohortStore
from kneebatch.progress import progress_bar


def _rgb(color: str) -> tuple[int, int, int]:
    return tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))


def write_colour_tables(out: Path) -> list[Path]:
    """ITK-SNAP label description file and a 3D Slicer colour table (.ctbl)."""
    itk = ["# ITK-SnAP Label Description File", "# IDX  -R-  -G-  -B-  -A--  VIS MSH  LABEL",
           '    0    0    0    0        0  0  0    "Clear Label"']
    slicer = ["# 3D Slicer colour table for kneebatch labels", "0 background 0 0 0 0"]
    for label in L.LABELS:
        r, g, b = _rgb(label.color)
        itk.append(f'{label.id:5d} {r:4d} {g:4d} {b:4d}        1  1  1    "{label.name}"')
        slicer.append(f"{label.id} {label.name} {r} {g} {b} 255")
    paths = [out / "kneebatch_labels_itksnap.txt", out / "kneebatch_labels.ctbl"]
    paths[0].write_text("\n".join(itk) + "\n")
    paths[1].write_text("\n".join(slicer) + "\n")
    return paths


def export_nifti(store_path, out, name: str = "labels", show_progress=None) -> tuple[int, list[str]]:
    """``OUT/<study_key>_labels.nii.gz`` for every study with a label map; returns (written, keys without)."""
    store = CohortStore(store_path, create=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys = store.study_keys()
    written, missing = 0, []
    with progress_bar(len(keys), "exporting label maps", show_progress) as advance:
        for key in keys:
            labels = store.read_labels(key, name)
            if labels is None:
                missing.append(key)
            else:
                write_label_nifti(out / f"{key}_{name}.nii.gz", labels, store.grid(key))
                written += 1
            advance()
    write_colour_tables(out)
    return written, missing
