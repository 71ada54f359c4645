"""``kneebatch export``: label maps from the store as NIfTI, with colour tables for viewers."""

from __future__ import annotations

from pathlib import Path

from kneebatch import labels as L
from kneebatch.ingest.label_import import study_names
from kneebatch.ingest.nifti import write_image_nifti, write_label_nifti
from kneebatch.ingest.store import CohortStore
from kneebatch.outputs import claim_output_dir, read_rows
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


FORMATS = ("nifti", "seg")


def export_nifti(store_path, out, name: str | None = None, model: str | None = None, names: str = "key",
                 images: bool = False, show_progress=None, format: str = "nifti",
                 per_study: dict | None = None) -> tuple[int, list[str], list[str]]:
    """``OUT/<name>_labels.nii.gz`` (and with ``images``, ``OUT/<name>_<ROLE>.nii.gz`` per channel)
    for every study with a label map, in the voxel order of the study's source (the reference
    series) so they open aligned with it. ``<name>`` is the study key, or with
    ``names="uid"`` the StudyInstanceUID / case name (identifiers: for the user's own use).
    The label map is ``per_study``'s for the study (the maps a run wrote), else ``name`` (e.g.
    ``truth``), else the segmentation of ``model``, else the newest. Returns (written, keys
    without a label map, the label map names used).

    ``format="seg"``: ``OUT/<name>_seg.dcm``, a DICOM SEG on the study's source series
    (:mod:`kneebatch.dicom_seg`; the source must still be where it was converted from); a study
    whose SEG cannot be made is listed in ``OUT/seg_failures.txt``."""
    if format not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    if names not in ("key", "uid"):
        raise ValueError(f"--names must be key or uid, not {names!r}")
    store = CohortStore(store_path, create=False)
    store.require_labels(name, model)
    # a folder of the user's own files is never written into: a file could share a name
    out = claim_output_dir(out, "export", {})
    keys = store.study_keys()
    file_name = {k: (n[1] or k) if names == "uid" else n[0] for k, n in study_names(store).items()}
    written, missing, used, failures = 0, [], set(), []
    # read once, not per study: a SEG needs each study's source path
    keymap = {r["study_key"]: r for r in read_rows(store.keymap_path)} if format == "seg" else {}
    with progress_bar(len(keys), "exporting label maps", show_progress) as advance:
        for key in keys:
            if per_study is not None and key not in per_study:
                label_name, labels = None, None
            else:
                label_name, labels = store.chosen_labels(key, (per_study or {}).get(key, name), model)
            if labels is None:
                missing.append(key)
                advance()
                continue
            reorientation, source = store.source_order(key)
            stem = _safe_name(file_name[key])
            if format == "seg":
                from kneebatch.dicom_seg import write_seg

                try:
                    write_seg(store, key, reorientation.invert(labels, source), out / f"{stem}_seg.dcm", keymap.get(key))
                except Exception as e:  # one study's missing source never stops the export
                    failures.append(f"{key}\t{type(e).__name__}: {e}")
                    missing.append(key)
                    advance()
                    continue
            else:
                write_label_nifti(out / f"{stem}_labels.nii.gz", reorientation.invert(labels, source), source)
            if images:
                image, _ = store.read_image(key)
                back = reorientation.invert(image, source)
                for role, channel in zip(store.channels(key), back):
                    write_image_nifti(out / f"{stem}_{role}.nii.gz", channel, source)
            used.add(label_name)
            written += 1
            advance()
    write_colour_tables(out)
    if failures:
        (out / "seg_failures.txt").write_text("\n".join(failures) + "\n")
    return written, missing, sorted(used)


def _safe_name(name: str) -> str:
    """A study's name as a file name: UIDs and case names never become paths."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name).lstrip(".") or "study"
