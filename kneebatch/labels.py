"""The label schema: the only place where label ids, names, groups and colours live.

Every other module looks labels up here (``LABELS``, ``by_name``) instead of
hard-coding an id, so adding or renumbering a tissue is a one-line change.
Id 0 is background and is not a tissue.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Label:
    id: int
    name: str
    group: str  # bone, cartilage, meniscus, ligament, tendon, muscle, fat, fluid
    color: str  # "#rrggbb", used by exports and reports
    bone: str | None = None  # for cartilage plates: the bone whose surface carries it


LABELS: tuple[Label, ...] = (
    Label(1, "femur", "bone", "#e3dac9"),
    Label(2, "tibia", "bone", "#d8cfb8"),
    Label(3, "fibula", "bone", "#c9bfa5"),
    Label(4, "patella", "bone", "#f0e6d2"),
    Label(5, "femoral_cartilage", "cartilage", "#4a90d9", bone="femur"),
    Label(6, "medial_tibial_cartilage", "cartilage", "#50c878", bone="tibia"),
    Label(7, "lateral_tibial_cartilage", "cartilage", "#2e8b57", bone="tibia"),
    Label(8, "patellar_cartilage", "cartilage", "#9370db", bone="patella"),
    Label(9, "medial_meniscus", "meniscus", "#ff8c00"),
    Label(10, "lateral_meniscus", "meniscus", "#ffb347"),
    Label(11, "acl", "ligament", "#dc143c"),
    Label(12, "pcl", "ligament", "#b22222"),
    Label(13, "mcl", "ligament", "#ff6f61"),
    Label(14, "lcl", "ligament", "#cd5c5c"),
    Label(15, "patellar_tendon", "tendon", "#8b4513"),
    Label(16, "quadriceps_muscle", "muscle", "#c71585"),
    Label(17, "hamstring_muscle", "muscle", "#db7093"),
    Label(18, "gastrocnemius_muscle", "muscle", "#ff69b4"),
    Label(19, "subcutaneous_fat", "fat", "#ffe4b5"),
    Label(20, "effusion", "fluid", "#00bfff"),
)

# the OA cartilage subregions measured per plate (Wirth & Eckstein 2008; kneebatch.cartilage_regions)
FEMORAL_REGIONS = ("TrF", "cMF", "pMF", "cLF", "pLF")
# the weight-bearing femur's external, central and internal thirds (within cMF / cLF)
CENTRAL_FEMUR_THIRDS = tuple(f"{t}c{c}F" for c in ("M", "L") for t in ("e", "c", "i"))
TIBIAL_REGIONS = tuple(f"{r}{p}" for p in ("MT", "LT") for r in ("c", "a", "p", "e", "i"))
CARTILAGE_REGIONS = FEMORAL_REGIONS + CENTRAL_FEMUR_THIRDS + TIBIAL_REGIONS

BACKGROUND = 0
N_CLASSES = 1 + max(label.id for label in LABELS)  # including background

_BY_NAME = {label.name: label for label in LABELS}
_BY_ID = {label.id: label for label in LABELS}


def by_name(name: str) -> Label:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown label {name!r}; known: {', '.join(_BY_NAME)}") from None


def by_id(label_id: int) -> Label:
    return _BY_ID[label_id]


def in_group(group: str) -> tuple[Label, ...]:
    return tuple(label for label in LABELS if label.group == group)


def ids(*names: str) -> tuple[int, ...]:
    return tuple(by_name(n).id for n in names)


def to_json(indent: int | None = 2) -> str:
    return json.dumps(
        [{k: v for k, v in asdict(label).items() if v is not None} for label in LABELS],
        indent=indent,
    )


def _check_schema() -> None:
    ids_ = [label.id for label in LABELS]
    names = [label.name for label in LABELS]
    assert len(set(ids_)) == len(ids_) and BACKGROUND not in ids_, "label ids must be unique and >0"
    assert len(set(names)) == len(names), "label names must be unique"
    assert max(ids_) < 256, "label maps are uint8"
    for label in LABELS:
        assert label.bone is None or label.bone in _BY_NAME, label


_check_schema()


# label map names in a store: ``labels-<model hash>`` per engines that segmented a study, or a
# set's own name (``truth``, ``oai-zib``)
SEGMENTATION_PREFIX = "labels-"


def segmentation_name(model_hash: str) -> str:
    """The label map name of the engines with this model hash (``coarse12+fine12+config8``)."""
    return SEGMENTATION_PREFIX + model_hash.replace("+", "-")
