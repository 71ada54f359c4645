"""Models recorded once by name (``kneebatch models add``), run by name (``run --model NAME``).

A record holds what a run needs to know about another tool's model and what must not change
under it: the folder (read in place, never copied), its kind, the sha256 of every file
inference reads, the store role of each input channel, its labels as kneebatch's tissues and
the axis order it was trained in. A run by name checks the files against the record first,
so a model replaced on disk stops the run in one line instead of mixing two models' labels.

The records live in ``~/.config/kneebatch/models.json`` (``$KNEEBATCH_MODELS`` elsewhere); they
hold no secret, only paths and hashes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from kneebatch import labels as L
from kneebatch.outputs import write_text_atomic

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def registry_path() -> Path:
    env = os.environ.get("KNEEBATCH_MODELS")
    return Path(env) if env else Path.home() / ".config" / "kneebatch" / "models.json"


def records() -> dict[str, dict]:
    path = registry_path()
    if not path.exists():
        return {}
    return json.loads(path.read_text()).get("models", {})


def add(path, name: str, channels: str | None = None, label_map: str | None = None,
        axis_order: str = "store", replace: bool = False) -> dict:
    """Record the nnU-Net v2 folder ``path`` as ``name``; its labels and inputs are checked now
    (the same one-line errors a run would give)."""
    from kneebatch.geometry import orientation_direction
    from kneebatch.inference.external import model_roles
    from kneebatch.inference.model_set import declared_inputs, open_model
    from kneebatch.ingest.roles import ROLES

    if not NAME.match(name):
        raise ValueError(f"model name {name!r}: letters, digits, '.', '_' or '-', up to 64")
    known = records()
    if name in known and not replace:
        raise ValueError(f"a model named {name} is recorded already ({known[name]['path']}); add --replace to "
                         "record this one instead")
    roles = model_roles(declared_inputs(path), ROLES, channels)
    if axis_order != "store":
        orientation_direction(axis_order)
    model = open_model(path, roles, label_map, axis_order=axis_order)
    record = {"kind": model.kind, "path": str(Path(path).resolve()), "model_name": model.name,
              "sha256": model.hashes, "roles": roles, "label_map": label_map, "axis_order": model.axis_order,
              "tissues": sorted(L.by_id(i).name for i in model.covered)}
    known[name] = record
    registry_path().parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(registry_path(), json.dumps({"models": known}, indent=1, sort_keys=True))
    return record


def resolve(name_or_path: str) -> tuple[str, dict | None]:
    """The folder a ``--model`` names and its record (None for a folder given by path): a
    recorded model's files are checked against the record."""
    from kneebatch.inference.model_set import open_model

    known = records()
    if name_or_path in known and not Path(name_or_path).exists():
        record = known[name_or_path]
        now = open_model(record["path"], record["roles"], record["label_map"]).hashes
        changed = sorted(f for f in set(now) | set(record["sha256"]) if record["sha256"].get(f) != now.get(f))
        if changed:
            raise ValueError(f"model {name_or_path}: {', '.join(changed)} changed since 'kneebatch models add' "
                             "recorded it; record it again (--replace) if that is intended")
        return record["path"], record
    if not Path(name_or_path).exists():
        hint = f"recorded models: {', '.join(known)}" if known else "no models are recorded (kneebatch models add)"
        raise ValueError(f"--model {name_or_path}: no such folder and no recorded model of that name; {hint}")
    return name_or_path, None
