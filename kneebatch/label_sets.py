"""Label sets: which of kneebatch's labels each id of another tool's label files stands for,
and the one ``--label-map`` grammar that names them.

``--label-map`` is ``ID:LABEL[+LABEL...],...`` (labels of the schema, ``kneebatch labels``;
``background`` for ids to drop) or a data set's name (``oai-zib``, ``skm-tea``). Read two ways:

- a *translation* of full label maps (:func:`parse_label_map`, ``measure``/``import-labels``):
  every id to one label or background;
- a *label set* (:func:`parse_label_set`, training and dataset imports): an id may stand for
  several labels (OAI-ZIB's "tibial cartilage" is kneebatch's medial and lateral plates), and
  labels no id claims are not annotated. Training on such files uses a marginal loss
  (:mod:`kneebatch.training.losses`): the net's probabilities are summed over each id's labels,
  and the file's background stands for every label the set does not annotate, so tissues the
  data set leaves out are not unlearnt.

:func:`label_set_from_map` decides which a map is: one that names ``background`` translates
full labels; one that maps ids one to one onto every schema label is full labels too; any
other is a partial label set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kneebatch import labels as L

BACKGROUND = "background"


@dataclass(frozen=True)
class LabelSet:
    name: str
    classes: tuple  # ((file id, (schema label names...)), ...), file ids > 0

    @property
    def ids(self) -> dict[int, tuple[int, ...]]:
        return {i: tuple(L.by_name(n).id for n in names) for i, names in self.classes}

    @property
    def is_partial(self) -> bool:
        """Whether some schema label is not annotated, or an id stands for several labels."""
        covered = [lab for ids in self.ids.values() for lab in ids]
        return len(covered) != len(L.LABELS) or any(len(v) > 1 for v in self.ids.values())

    def class_names(self) -> list[str]:
        """Names of the set's classes in id order, background (every unannotated label) first."""
        return ["background"] + ["+".join(names) for _, names in sorted(self.classes)]

    def membership(self) -> np.ndarray:
        """``[n set classes, n schema classes]`` 0/1: which schema classes each set class sums."""
        m = np.zeros((len(self.classes) + 1, L.N_CLASSES), np.float32)
        order = {i: row + 1 for row, (i, _) in enumerate(sorted(self.classes))}
        for i, ids in self.ids.items():
            m[order[i], list(ids)] = 1
        m[0] = 1 - m[1:].sum(0)  # background: the labels no class claims, and 0
        return m

    def file_to_class(self) -> np.ndarray:
        """Lookup: a file id -> its row in :meth:`membership` (ids not in the set: -1)."""
        lut = np.full(max(i for i, _ in self.classes) + 1, -1, np.int64)
        lut[0] = 0
        for row, (i, _) in enumerate(sorted(self.classes)):
            lut[i] = row + 1
        return lut

    def schema_to_class(self) -> np.ndarray:
        """Lookup: a schema label id -> the set class that holds it (to score predictions)."""
        return np.argmax(self.membership(), axis=0)


LABEL_SETS = {
    "oai-zib": LabelSet("oai-zib", ((1, ("femur",)), (2, ("femoral_cartilage",)), (3, ("tibia",)),
                                    (4, ("medial_tibial_cartilage", "lateral_tibial_cartilage")))),
    "skm-tea": LabelSet("skm-tea", ((1, ("patellar_cartilage",)), (2, ("femoral_cartilage",)),
                                    (3, ("medial_tibial_cartilage",)), (4, ("lateral_tibial_cartilage",)),
                                    (5, ("medial_meniscus",)), (6, ("lateral_meniscus",)))),
}


def _pairs(text: str, rule: str) -> dict[int, tuple[str, ...]]:
    """``ID:NAME[+NAME...]`` items -> {id: names}, each name of the schema or ``background``;
    ``rule`` names the grammar in the error (the one message every reader gives)."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        src, _, names = item.partition(":")
        try:
            i = int(src)
            parts = tuple(n.strip() for n in names.split("+"))
            for n in parts:
                if n != BACKGROUND:
                    L.by_name(n)
            if i < 0:
                raise ValueError
        except (KeyError, ValueError):
            raise ValueError(f"--label-map: {item!r} is not {rule} ('kneebatch labels' lists the labels)") from None
        if i in out:
            raise ValueError(f"--label-map: id {i} is mapped twice")
        out[i] = parts
    if text.strip() and not out:
        raise ValueError("--label-map: no ID:LABEL pairs found")
    return out


def parse_label_map(text: str) -> dict[int, int]:
    """A translation: ``"1:femur,2:femoral_cartilage,9:background"`` -> {1: id of femur, 2: ..., 9: 0}."""
    rule = "ID:LABEL with a non-negative ID used once and a label of the schema or background"
    out = {}
    for i, names in _pairs(text, rule).items():
        if len(names) != 1:
            raise ValueError(f"--label-map: id {i} maps to {'+'.join(names)}; a translation maps each id to one "
                             f"label ({rule})")
        out[i] = 0 if names[0] == BACKGROUND else L.by_name(names[0]).id
    return out


def parse_label_set(text: str) -> LabelSet:
    """A data set's name (``oai-zib``, ``skm-tea``) or ``"1:femur,4:medial_tibial_cartilage+lateral_tibial_cartilage"``."""
    text = text.strip()
    if text.lower() in LABEL_SETS:
        return LABEL_SETS[text.lower()]
    rule = (f"ID:LABEL[+LABEL...] with a positive ID used once and labels of the schema, or one of "
            f"{', '.join(LABEL_SETS)}")
    classes = _pairs(text, rule)
    if 0 in classes or any(BACKGROUND in names for names in classes.values()):
        raise ValueError(f"--label-map: a label set names no background and no id 0 ({rule})")
    if not classes:
        raise ValueError("--label-map: no ID:LABEL pairs found")
    claimed = [n for parts in classes.values() for n in parts]
    if len(claimed) != len(set(claimed)):
        raise ValueError("--label-map: a label is claimed by two ids")
    return LabelSet("custom", tuple(sorted(classes.items())))


def label_set_from_map(text: str) -> LabelSet | None:
    """The partial label set a ``--label-map`` describes, or None when it describes full labels
    (it names ``background``: a translation; or it maps ids one to one onto every schema label)."""
    if not text.strip():
        return None
    if text.strip().lower() not in LABEL_SETS and any(
            BACKGROUND in names for names in _pairs(text, "ID:LABEL[+LABEL...]").values()):
        return None  # a translation of full labels
    label_set = parse_label_set(text)
    return label_set if label_set.is_partial else None
