"""The wheel: every package of the source tree is listed, and the engines go with it."""

import json
import tomllib
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _glob(name: str, pattern: str) -> bool:
    """setuptools' package-data glob: '*' stays within one folder."""
    parts, globs = name.split("/"), pattern.split("/")
    return len(parts) == len(globs) and all(fnmatch(p, g) for p, g in zip(parts, globs))


def test_the_wheel_lists_every_package_and_carries_the_engines():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "kneebatch").rglob("__init__.py")}
    assert found and found <= set(tool["packages"]), found - set(tool["packages"])
    assert tool["package-dir"] == {"kneebatch.engines": "engines"}
    patterns = tool["package-data"]["kneebatch.engines"]
    sets = json.loads((ROOT / "engines" / "sets.json").read_text())["sets"]
    assert sets and any(_glob("sets.json", g) for g in patterns)
    for name in sets:  # every file a set's manifest names goes into the wheel
        manifest = json.loads((ROOT / "engines" / name / "engines.json").read_text())
        needed = {manifest["config"], "engines.json"} | {manifest[s][f] for s in ("coarse", "fine")
                                                          for f in ("safetensors", "onnx")}
        needed.add("TRAINING.md")  # the set's training card
        packaged = {n for n in needed if any(_glob(f"{name}/{n}", g) for g in patterns)}
        assert needed == packaged, (name, needed - packaged)
        assert all((ROOT / "engines" / name / n).exists() for n in needed), name
