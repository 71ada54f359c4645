"""The cohort store: one Zarr v3 directory for a whole cohort.

Layout::

    STORE/
      zarr.json                 root group (attrs: format, version)
      <study_key>/              one group per study (pseudonymous key, no identifiers)
        zarr.json               attrs: study-level provenance (no identifiers)
        image/                  uint16 [C, Z, Y, X], C = channels attr (T1, T2)
        labels-<model>/         uint8 [Z, Y, X], one per engines that segmented it (same grid)
        truth/                  uint8 [Z, Y, X], reference labels (training, tests)
      keymap.parquet            study_key, study_uid, source_path, patient_id, study_date,
                                subject_key (the only identifiers)
      visits.parquet            study_key, subject_key, visit_days (made from the keymap)
      failures.parquet          study_key, stage, reason, message

A study group is written under ``STORE/.partial/`` and renamed into place, so a
study is either complete or absent; that makes resume a directory listing.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from kneebatch import __version__
from kneebatch.geometry import Grid, Reorientation
from kneebatch.labels import SEGMENTATION_PREFIX, segmentation_name  # noqa: F401 - the store's label map names

FORMAT = "kneebatch-cohort-store"
_KEY = re.compile(r"^[a-z][0-9a-f]{8,64}$")  # study keys are hex digests: never a path
FORMAT_VERSION = 2  # 2: canonical voxel order, channels by contrast role, label maps per model
CHUNK_ZYX = (32, 128, 128)
PARTIAL = ".partial"
INDEX = "studies.idx"  # the store's study keys, a line each
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # label map names: never a path


def is_store(folder) -> bool:
    """A kneebatch cohort store (its files are outputs, never inputs)."""
    try:
        with open(os.path.join(folder, "zarr.json"), "rb") as f:
            return FORMAT.encode() in f.read(4096)
    except OSError:
        return False


def _compressor():
    return BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle)


class CohortStore:
    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path)
        if (self.path / "zarr.json").exists():
            root = zarr.open_group(str(self.path), mode="r")
            if root.attrs.get("format") != FORMAT:
                raise ValueError(f"{self.path} is a Zarr group but not a kneebatch cohort store")
            if root.attrs.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{self.path} is a cohort store of format {root.attrs.get('format_version')} "
                                 f"(this kneebatch reads {FORMAT_VERSION}): convert the source again into a new store")
        elif create:
            if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
                # never write into (let alone clear) a folder kneebatch did not create
                raise ValueError(f"{self.path} exists and is not a kneebatch cohort store; "
                                 "choose a new or empty folder")
            self.path.mkdir(parents=True, exist_ok=True)
            root = zarr.open_group(str(self.path), mode="w")
            root.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "created_by": __version__})
            self.index_path.touch()
        else:
            raise FileNotFoundError(f"no cohort store at {self.path}")

    def key_fingerprint(self) -> str | None:
        """The fingerprint of the study-key secret the store was converted with (None: none yet)."""
        return zarr.open_group(str(self.path), mode="r").attrs.get("key_fingerprint")

    def check_key(self, fingerprint: str) -> None:
        """Record the study-key secret's fingerprint, or refuse another key: keys made with two
        secrets would store every study twice under two names."""
        root = zarr.open_group(str(self.path), mode="a")
        recorded = root.attrs.get("key_fingerprint")
        if recorded is None:
            root.attrs["key_fingerprint"] = fingerprint
        elif recorded != fingerprint:
            raise ValueError(f"{self.path} was converted with another study-key secret (fingerprint {recorded}, "
                             f"this key {fingerprint}); use that key file (--key-file) or a new store")

    def clear_partial(self, owns=lambda key: True) -> int:
        """Remove half-written studies left by a killed writer: those of the keys this writer
        ``owns`` (a shard's), never another shard's study in the making."""
        partial = self.path / PARTIAL
        n = 0
        if partial.exists():
            for p in partial.iterdir():
                if not owns(p.name.rsplit("-", 1)[0]):
                    continue
                shutil.rmtree(p, ignore_errors=True)
                n += 1
            try:
                partial.rmdir()
            except OSError:
                pass  # something is still being written there
        return n

    # ---------------------------------------------------------------- listing
    @property
    def keymap_path(self) -> Path:
        return self.path / "keymap.parquet"

    @property
    def failures_path(self) -> Path:
        return self.path / "failures.parquet"

    @property
    def index_path(self) -> Path:
        return self.path / INDEX

    def study_keys(self) -> list[str]:
        """The studies of the store, from its index (one file, however many studies), or, for a
        store without one, from a walk of its folders."""
        if self.index_path.exists():
            return sorted(set(self.index_path.read_text().split()))
        return self._walk()

    def _walk(self) -> list[str]:
        return sorted(
            p.name for p in self.path.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / "image" / "zarr.json").exists()
        )

    def _index(self, key: str) -> None:
        """Record a written study: one short line appended (O_APPEND: whole lines, also from
        several writers at once)."""
        if not self.index_path.exists():  # a store from before the index: list what is there first
            from kneebatch.outputs import write_text_atomic

            write_text_atomic(self.index_path, "".join(f"{k}\n" for k in self._walk() if k != key))
        fd = os.open(self.index_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{key}\n".encode())
        finally:
            os.close(fd)

    def has_study(self, key: str) -> bool:
        return (self._dir(key) / "image" / "zarr.json").exists()

    def _dir(self, key: str) -> Path:
        """The study's folder; refuses anything but a study key, so nothing lands outside the store."""
        if not _KEY.match(key):
            raise ValueError(f"not a study key: {key!r}")
        return self.path / key

    # ---------------------------------------------------------------- writing
    def write_study(self, key: str, image: np.ndarray, grid: Grid, channels: list[str], attrs: dict) -> None:
        """Write a whole study atomically (temp group + rename)."""
        if image.ndim != 4 or image.shape[1:] != grid.shape or image.shape[0] != len(channels):
            raise ValueError(f"image {image.shape} does not match grid {grid.shape} and channels {channels}")
        partial = self.path / PARTIAL / f"{self._dir(key).name}-{uuid.uuid4().hex[:8]}"
        partial.parent.mkdir(parents=True, exist_ok=True)
        try:
            group = zarr.open_group(str(partial), mode="w")
            group.attrs.update({"study_key": key, "kneebatch_version": __version__, **attrs})
            chunks = (1, *(min(c, s) for c, s in zip(CHUNK_ZYX, grid.shape)))
            arr = group.create_array("image", shape=image.shape, dtype=image.dtype, chunks=chunks,
                                     compressors=_compressor(), dimension_names=("c", "z", "y", "x"))
            arr[...] = image
            arr.attrs.update({**grid.to_attrs(), "channels": list(channels)})
            target = self._dir(key)
            if target.exists():  # a half-removed or stale copy: the new one wins
                shutil.rmtree(target)
            os.replace(partial, target)
            self._index(key)
        finally:
            if partial.exists():
                shutil.rmtree(partial, ignore_errors=True)

    def write_labels(self, key: str, labels: np.ndarray, attrs: dict | None = None, name: str = "truth") -> None:
        """A uint8 label map on the study grid, written atomically (temp array + rename).

        ``name``: ``truth`` (reference labels for training), an imported set, or
        :func:`segmentation_name` of the engines that made it: runs with other engines
        never overwrite each other's label maps."""
        grid = self.grid(key)
        if labels.shape != grid.shape:
            raise ValueError(f"labels {labels.shape} do not match the study grid {grid.shape}")
        if not _NAME.match(name) or name == "image":
            raise ValueError(f"not a label map name: {name!r}")
        study = self._dir(key)
        tmp = f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            group = zarr.open_group(str(study), mode="a")
            chunks = tuple(min(c, s) for c, s in zip(CHUNK_ZYX, grid.shape))
            arr = group.create_array(tmp, shape=labels.shape, dtype=np.uint8, chunks=chunks,
                                     compressors=_compressor(), dimension_names=("z", "y", "x"))
            arr[...] = labels.astype(np.uint8)
            arr.attrs.update({**grid.to_attrs(), **(attrs or {}),
                              "written_utc": datetime.now(UTC).isoformat(timespec="microseconds")})
            old = study / f".{name}.old-{uuid.uuid4().hex[:8]}"
            if (study / name).exists():
                os.replace(study / name, old)
            os.replace(study / tmp, study / name)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(study / tmp, ignore_errors=True)

    def label_names(self, key: str) -> list[str]:
        """The label maps a study has (``truth``, imported sets, one per engines that segmented it)."""
        study = self._dir(key)
        return sorted(p.name for p in study.iterdir()
                      if p.name != "image" and not p.name.startswith(".") and (p / "zarr.json").exists())

    def require_labels(self, name: str | None = None, model: str | None = None) -> None:
        """Refuse, before anything is written, a label map ``name`` or a ``model`` that no study
        of the store has (a typo would otherwise measure nothing and exit 0)."""
        if not (name or model):
            return
        prefix = SEGMENTATION_PREFIX + (model or "").replace("+", "-")
        have = set()
        for k in self.study_keys():
            names = self.label_names(k)
            if (name in names) if name else any(n.startswith(prefix) for n in names):
                return
            have.update(names)
        what = f"a label map named {name!r}" if name else f"a segmentation of model {model!r}"
        raise ValueError(f"no study of the store has {what}; its label maps: {', '.join(sorted(have)) or 'none'}")

    def segmentation(self, key: str, model: str | None = None) -> str | None:
        """The name of the newest segmentation of a study, or of the one whose model hash
        starts with ``model``; None when there is none."""
        names = [n for n in self.label_names(key) if n.startswith(SEGMENTATION_PREFIX)]
        if model:
            names = [n for n in names if n[len(SEGMENTATION_PREFIX):].startswith(model.replace("+", "-"))]
        if not names:
            return None
        return max(names, key=lambda n: (self._array(key, n).attrs.get("written_utc", ""), n))

    # ---------------------------------------------------------------- reading
    def study_attrs(self, key: str) -> dict:
        return dict(zarr.open_group(str(self._dir(key)), mode="r").attrs)

    def source_order(self, key: str) -> tuple[Reorientation, Grid]:
        """How the study's stored (canonical) arrays map back to its source's voxel order, and that grid."""
        attrs = self.study_attrs(key)
        if "source_grid" not in attrs:  # stores written before orientation was canonical
            return Reorientation((0, 1, 2), (False, False, False)), self.grid(key)
        source = Grid(tuple(attrs["source_grid"]["shape_zyx"]), np.asarray(attrs["source_grid"]["affine"]))
        return Reorientation.from_attrs(attrs["to_canonical"]), source

    def grid(self, key: str) -> Grid:
        return Grid.from_attrs(self._array(key, "image").attrs)

    def channels(self, key: str) -> list[str]:
        return list(self._array(key, "image").attrs["channels"])

    def read_image(self, key: str, channels: list[int] | None = None) -> tuple[np.ndarray, Grid]:
        """The image ``[C, Z, Y, X]`` (only the ``channels`` indices, in that order, if given)."""
        arr = self._array(key, "image")
        data = arr[...] if channels is None else np.stack([arr[c] for c in channels])
        return data, Grid.from_attrs(arr.attrs)

    def read_labels(self, key: str, name: str | None = None) -> np.ndarray | None:
        """A label map by name (default: the newest segmentation); None when absent."""
        name = self.segmentation(key) if name is None else name
        if name is None or not _NAME.match(name) or not (self._dir(key) / name / "zarr.json").exists():
            return None
        return self._array(key, name)[...]

    def read_schema_labels(self, key: str, name: str | None = None) -> np.ndarray | None:
        """:meth:`read_labels` for measuring and exporting: a partial label set's map (its ids are
        the data set's, e.g. OAI-ZIB's 1-4, not the schema's) raises ``partial_label_set``."""
        name = self.segmentation(key) if name is None else name
        labels = self.read_labels(key, name)
        found = self.label_attrs(key, name).get("label_set") if labels is not None else None
        if found:
            from kneebatch.errors import StudyError

            raise StudyError("partial_label_set", f"'{name}' holds {found} ids")
        return labels

    def chosen_labels(self, key: str, name: str | None = None, model: str | None = None):
        """(name, schema label map) of the label map ``name``, else the segmentation of ``model``,
        else the newest segmentation; (name or None, None) when the study has no such map."""
        name = name or self.segmentation(key, model)
        return name, (self.read_schema_labels(key, name) if name else None)

    def label_attrs(self, key: str, name: str) -> dict:
        return dict(self._array(key, name).attrs)

    def label_title(self, key: str, name: str) -> str:
        """A label map as a person names it: the engine set (or model) that made it, then its
        store name (``engine set t1-t2 (seg-…)``); an imported map by its name (``truth``)."""
        made_by = self.label_attrs(key, name).get("engine_set") if name in self.label_names(key) else None
        return f"engine set {made_by} ({name})" if made_by else name

    def _array(self, key: str, name: str):
        return zarr.open_array(str(self._dir(key) / name), mode="r")
