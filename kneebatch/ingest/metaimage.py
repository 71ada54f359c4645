"""MetaImage (``.mhd`` + raw, or ``.mha``) reading, as public knee sets (OAI-ZIB) ship.

ITK's conventions: ``DimSize``/``ElementSpacing``/``Offset`` are in (x, y, z) order,
the world frame is LPS, and row *i* of ``TransformMatrix`` is the direction of axis *i*.
Voxels are stored x fastest, so the data reshape to ``[z, y, x]`` directly.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from kneebatch.errors import StudyError
from kneebatch.geometry import Grid

_TYPES = {"MET_UCHAR": np.uint8, "MET_CHAR": np.int8, "MET_USHORT": np.uint16, "MET_SHORT": np.int16,
          "MET_UINT": np.uint32, "MET_INT": np.int32, "MET_FLOAT": np.float32, "MET_DOUBLE": np.float64}
MAX_VOXELS = 400_000_000  # as for DICOM and NIfTI: checked before any voxel is read


def read_header(path) -> tuple[dict, int]:
    """Header fields and, for ``.mha``, the byte offset of the data."""
    raw = Path(path).read_bytes()
    fields, pos = {}, 0
    while pos < len(raw):
        end = raw.find(b"\n", pos)
        end = len(raw) if end < 0 else end
        line = raw[pos:end].decode("latin-1").strip()
        pos = end + 1
        if "=" in line:
            key, value = (s.strip() for s in line.split("=", 1))
            fields[key] = value
            if key == "ElementDataFile":
                break
    return fields, pos


def read_metaimage(path) -> tuple[np.ndarray, Grid]:
    path = Path(path)
    h, data_start = read_header(path)
    try:
        ndims = int(h.get("NDims", "3"))
        dims = [int(v) for v in h["DimSize"].split()]
        dtype = np.dtype(_TYPES[h["ElementType"]])
    except (KeyError, ValueError) as e:
        raise StudyError("bad_geometry", f"MetaImage header incomplete: {e}") from e
    if ndims != 3 or len(dims) != 3 or int(h.get("ElementNumberOfChannels", "1")) != 1:
        raise StudyError("bad_geometry", f"expected a 3D single-channel MetaImage, got {ndims}D {dims}")
    if min(dims) < 1 or np.prod(dims, dtype=np.float64) > MAX_VOXELS:
        raise StudyError("too_large" if min(dims) >= 1 else "bad_geometry", " x ".join(map(str, dims)))
    spacing = [float(v) for v in h.get("ElementSpacing", h.get("ElementSize", "1 1 1")).split()]
    offset = [float(v) for v in h.get("Offset", h.get("Position", "0 0 0")).split()]
    matrix = np.array([float(v) for v in h.get("TransformMatrix", "1 0 0 0 1 0 0 0 1").split()]).reshape(3, 3)
    if h.get("BinaryDataByteOrderMSB", "False").lower() == "true":
        dtype = dtype.newbyteorder(">")
    data_file = h.get("ElementDataFile", "LOCAL")
    if data_file == "LOCAL":
        blob = path.read_bytes()[data_start:]
    else:
        # only a file beside the header: a header must not make kneebatch read elsewhere
        target = path.parent / data_file
        if Path(data_file).name != data_file or not target.is_file() or target.is_symlink():
            raise StudyError("unreadable_pixels", "ElementDataFile must name a file in the header's own folder")
        blob = target.read_bytes()
    if h.get("CompressedData", "False").lower() == "true":
        blob = zlib.decompress(blob)
    n = int(np.prod(dims))
    if len(blob) < n * dtype.itemsize:
        raise StudyError("unreadable_pixels", f"{len(blob)} bytes for {n} voxels of {dtype}")
    data = np.frombuffer(blob[: n * dtype.itemsize], dtype=dtype).reshape(dims[::-1]).astype(dtype.newbyteorder("="))
    # axes (x, y, z) of the file are our (X, Y, Z); reverse to (z, y, x)
    direction = matrix[::-1].T  # columns: directions of z, y, x
    spacing_zyx = spacing[::-1]
    return data, Grid.from_parts(data.shape, spacing_zyx, offset, direction)


def write_metaimage(path, data: np.ndarray, grid: Grid) -> None:
    """``.mha`` with the data inline (for tests and exports)."""
    names = {np.dtype(v): k for k, v in _TYPES.items()}
    direction = grid.direction.T[::-1]  # rows: directions of x, y, z
    header = "\n".join([
        "ObjectType = Image", "NDims = 3", "BinaryData = True", "BinaryDataByteOrderMSB = False",
        "CompressedData = False",
        "TransformMatrix = " + " ".join(f"{v:.10g}" for v in direction.ravel()),
        "Offset = " + " ".join(f"{v:.10g}" for v in grid.origin),
        "ElementSpacing = " + " ".join(f"{v:.10g}" for v in grid.spacing[::-1]),
        "DimSize = " + " ".join(str(s) for s in data.shape[::-1]),
        f"ElementType = {names[np.dtype(data.dtype)]}", "ElementDataFile = LOCAL", ""])
    Path(path).write_bytes(header.encode() + np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<")).tobytes())
