"""The cohort store: one Zarr v3 directory for a whole cohort.

Layout::

    STORE/
      zarr.json                 root group (attrs: format, version)
      <study_key>/              one group per study (pseudonymous key, no identifiers)
        zarr.json               attrs: study-level provenance (no identifiers)
        image/                  uint16 [C, Z, Y, X], C = channels attr (T1, T2)
        labels/                 uint8 [Z, Y, X], written by segmentation (same grid)
      keymap.parquet            study_key, study_uid, source_path (the only identifiers)
      failures.parquet          study_key, stage, reason, message

A study group is written under ``STORE/.partial/`` and renamed into place, so a
study is either complete or absent; that makes resume a directory listing.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from kneebatch import __version__
from kneebatch.geometry import Grid

import re

FORMAT = "kneebatch-cohort-store"
_KEY = re.compile(r"^[a-z][0-9a-f]{8,64}$")  # study keys are hex digests: never a path
FORMAT_VERSION = 1
CHUNK_ZYX = (32, 128, 128)
PARTIAL = ".partial"


def _compressor():
    return BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle)


class CohortStore:
    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path)
        if (self.path / "zarr.json").exists():
            root = zarr.open_group(str(self.path), mode="r")
            if root.attrs.get("format") != FORMAT:
                raise ValueError(f"{self.path} is a Zarr group but not a kneebatch cohort store")
        elif create:
            self.path.mkdir(parents=True, exist_ok=True)
            root = zarr.open_group(str(self.path), mode="w")
            root.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "created_by": __version__})
        else:
            raise FileNotFoundError(f"no cohort store at {self.path}")

    def clear_partial(self) -> int:
        """Remove half-written studies left by a killed writer (one writer per store at a time)."""
        partial = self.path / PARTIAL
        n = 0
        if partial.exists():
            for p in partial.iterdir():
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        return n

    # ---------------------------------------------------------------- listing
    @property
    def keymap_path(self) -> Path:
        return self.path / "keymap.parquet"

    @property
    def failures_path(self) -> Path:
        return self.path / "failures.parquet"

    def study_keys(self) -> list[str]:
        return sorted(
            p.name for p in self.path.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / "image" / "zarr.json").exists()
        )

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
        finally:
            if partial.exists():
                shutil.rmtree(partial, ignore_errors=True)

    def write_labels(self, key: str, labels: np.ndarray, attrs: dict | None = None, name: str = "labels") -> None:
        """A uint8 label map on the study grid; ``name`` = ``labels`` (segmentation) or ``truth``."""
        grid = self.grid(key)
        if labels.shape != grid.shape:
            raise ValueError(f"labels {labels.shape} do not match the study grid {grid.shape}")
        group = zarr.open_group(str(self._dir(key)), mode="a")
        chunks = tuple(min(c, s) for c, s in zip(CHUNK_ZYX, grid.shape))
        arr = group.create_array(name, shape=labels.shape, dtype=np.uint8, chunks=chunks,
                                 compressors=_compressor(), dimension_names=("z", "y", "x"), overwrite=True)
        arr[...] = labels.astype(np.uint8)
        arr.attrs.update({**grid.to_attrs(), **(attrs or {})})

    # ---------------------------------------------------------------- reading
    def study_attrs(self, key: str) -> dict:
        return dict(zarr.open_group(str(self._dir(key)), mode="r").attrs)

    def grid(self, key: str) -> Grid:
        return Grid.from_attrs(self._array(key, "image").attrs)

    def channels(self, key: str) -> list[str]:
        return list(self._array(key, "image").attrs["channels"])

    def read_image(self, key: str) -> tuple[np.ndarray, Grid]:
        arr = self._array(key, "image")
        return arr[...], Grid.from_attrs(arr.attrs)

    def read_labels(self, key: str, name: str = "labels") -> np.ndarray | None:
        if not (self._dir(key) / name / "zarr.json").exists():
            return None
        return self._array(key, name)[...]

    def _array(self, key: str, name: str):
        return zarr.open_array(str(self._dir(key) / name), mode="r")
