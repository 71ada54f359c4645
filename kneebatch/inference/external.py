"""Other tools' trained models as kneebatch engines: what every kind shares.

A model (an nnU-Net v2 folder, :mod:`kneebatch.inference.nnunet`; an ONNX network with a JSON
spec, :mod:`kneebatch.inference.onnx_model`) takes some of the store's series (roles) and gives
label ids of its own; here they become kneebatch's tissues (:func:`label_lut`), the study is
turned to the voxel order the model was trained in and back (:class:`ExternalModel`); :mod:`kneebatch.inference.model_set`
opens a folder of either kind and stands it where ``run`` expects engine sets.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading

import numpy as np

from kneebatch import labels as L
from kneebatch.geometry import Grid, orientation_direction, to_canonical
from kneebatch.label_sets import parse_label_map

# names other tools give kneebatch's tissues (TotalSegmentator's MR tasks, SKM-TEA, OAI-ZIB)
ALIASES = {
    "femoral cartilage": "femoral_cartilage", "tibial cartilage medial": "medial_tibial_cartilage",
    "tibial cartilage lateral": "lateral_tibial_cartilage", "medial tibial cartilage": "medial_tibial_cartilage",
    "lateral tibial cartilage": "lateral_tibial_cartilage", "patellar cartilage": "patellar_cartilage",
    "meniscus medial": "medial_meniscus", "meniscus lateral": "lateral_meniscus",
    "medial meniscus": "medial_meniscus", "lateral meniscus": "lateral_meniscus",
    "quadriceps femoris": "quadriceps_muscle", "quadriceps": "quadriceps_muscle",
    "thigh posterior compartment": "hamstring_muscle", "hamstrings": "hamstring_muscle",
    "gastrocnemius": "gastrocnemius_muscle", "subcutaneous fat": "subcutaneous_fat",
    "joint effusion": "effusion", "femur bone": "femur", "tibia bone": "tibia",
}


def _canonical(name: str) -> str:
    name = name.lower().replace("_", " ").replace("-", " ").strip()
    for side in (" left", " right"):  # TotalSegmentator names both legs' muscles; a knee has one
        name = name.removesuffix(side)
    return " ".join(name.split())


def label_lut(labels: dict, label_map: str | None = None, others_background: bool = False) -> np.ndarray:
    """Lookup: the model's label id -> kneebatch's, from ``dataset.json``'s ``labels`` (names of
    the schema or of :data:`ALIASES`) or an explicit ``--label-map ID:LABEL,...`` translation.
    An unmapped label is an error that lists every one, or (``others_background``: a whole-body
    model, most of whose structures are not the knee's) background."""
    ids = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise ValueError(f"model: label {name!r} is a region ({value}); region-based models are not "
                             "supported")
        ids[int(value)] = name
    explicit = parse_label_map(label_map) if label_map else {}
    lut = np.zeros(max(ids) + 1, np.uint8)
    unmapped = []
    known = {_canonical(label.name): label.id for label in L.LABELS}
    for i, name in ids.items():
        if i == 0:
            continue
        if i in explicit:
            lut[i] = explicit[i]
            continue
        wanted = _canonical(name)
        target = known.get(wanted) or (L.by_name(ALIASES[wanted]).id if wanted in ALIASES else None)
        if target is None:
            unmapped.append(f"{i}:{name}")
        else:
            lut[i] = target
    if unmapped and not others_background:
        raise ValueError(f"model: labels not in kneebatch's schema: {', '.join(unmapped)}; map them with "
                         "--label-map ID:LABEL,... ('kneebatch labels' lists the labels; ID:background drops one)")
    return lut


def model_roles(channel_names: dict, known_roles, channels: str | None = None) -> list[str]:
    """The store role each input channel of the model takes: ``dataset.json``'s ``channel_names``
    where they name a role (``T1``, ``DESS`` ...), else ``--channels 0:DESS,1:PDFS``."""
    known = {r.upper(): r for r in known_roles}
    n = len(channel_names)
    given = {}
    for item in filter(None, (s.strip() for s in (channels or "").split(","))):
        index, _, role = item.partition(":")
        if not index.strip().isdigit() or role.strip().upper() not in known:
            raise ValueError(f"--channels: {item!r} is not INDEX:ROLE with a role of {', '.join(known.values())}")
        given[int(index)] = known[role.strip().upper()]
    if given and sorted(given) != list(range(n)):
        raise ValueError(f"--channels names channels {sorted(given)}; the model takes {n}: 0..{n - 1}")
    if given:
        return [given[i] for i in range(n)]
    roles = []
    for i in range(n):
        name = str(channel_names[str(i)])
        if name.upper() not in known:
            raise ValueError(f"model: input channel {i} is {name!r}, not a role of the store "
                             f"({', '.join(known.values())}); say which with --channels {i}:ROLE")
        roles.append(known[name.upper()])
    return roles


class ExternalModel:
    """A loaded model of another tool: ``segment`` takes a study's image and gives kneebatch labels.
    Subclasses set ``kind``, ``name``, ``hashes`` (file -> sha256) and implement ``_segment``."""

    kind = "external"

    def __init__(self, roles: list[str], lut: np.ndarray, device: str = "cpu", threads: int | None = None,
                 axis_order: str = "store", tta: bool = False):
        self.roles, self.lut, self.device_name, self.threads, self.tta = roles, lut, device, threads, tta
        # the voxel order the model was trained in: the store's, or a NIfTI orientation code
        self.axis_order = axis_order if axis_order == "store" else axis_order.upper()
        self._target = None if axis_order == "store" else orientation_direction(axis_order)
        self._lock = threading.Lock()  # one study at a time through the network
        self.hashes: dict[str, str] = {}
        self.name = self.kind

    @property
    def model_hash(self) -> str:
        digest = hashlib.sha256(json.dumps(self.hashes, sort_keys=True).encode()).hexdigest()
        return f"{self.kind}-{digest[:16]}"

    @property
    def label_name(self) -> str:
        return L.segmentation_name(self.model_hash) + ("-tta" if self.tta else "")

    @property
    def covered(self) -> set[int]:
        """kneebatch label ids the model segments."""
        return {int(v) for v in self.lut[1:] if v}

    @property
    def device(self):
        import torch

        return torch.device(self.device_name)

    def segment(self, image: np.ndarray, grid: Grid) -> np.ndarray:
        """kneebatch labels (uint8, on ``grid``) of ``image`` ``[C, Z, Y, X]`` (the model's channels,
        in its order) on ``grid``: brought to the model's axis order by an exact permutation and
        flips (no resampling), segmented, and brought back."""
        if self._target is None:
            return self._labels(image, grid.spacing)
        turn = to_canonical(grid, self._target)
        turned, turned_grid = turn.apply(image, grid)
        return turn.invert(self._labels(turned, turned_grid.spacing), turned_grid)

    def _labels(self, image: np.ndarray, spacing_zyx) -> np.ndarray:
        with self._exclusive():
            seg = np.asarray(self._segment(np.ascontiguousarray(image, dtype=np.float32),
                                           [float(s) for s in spacing_zyx]))
        return self._translated(seg)

    @contextlib.contextmanager
    def _exclusive(self):
        """One study at a time through the network, on the model's threads (restored after)."""
        import torch

        with self._lock:
            before = torch.get_num_threads()
            if self.threads:
                torch.set_num_threads(self.threads)
            try:
                yield
            finally:
                torch.set_num_threads(before)

    def _translated(self, seg: np.ndarray) -> np.ndarray:
        """The model's label ids as kneebatch's; an id it does not declare is an error."""
        if seg.max(initial=0) >= len(self.lut) or seg.min(initial=0) < 0:
            raise ValueError(f"the model predicted label {int(seg.max())}, beyond its labels")
        return self.lut[seg]

    def _segment(self, image: np.ndarray, spacing_zyx: list[float]) -> np.ndarray:
        """The model's own label ids of ``image`` (its axis order) with that spacing."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "files": self.hashes, "roles": self.roles,
                "label_lut": self.lut.tolist(), "mirror_tta": self.tta, "axis_order": self.axis_order}

    def verify(self) -> None:
        """What must work before a run writes anything (the network loads)."""
