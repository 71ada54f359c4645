"""What machine a benchmark ran on (recorded with every result)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device(kind: str = "cpu") -> str:
    if kind.startswith("cuda"):
        import torch

        return f"GPU: {torch.cuda.get_device_name()} (+ CPU: {cpu_name()}, {os.cpu_count()} cores)"
    return f"CPU: {cpu_name()} ({os.cpu_count()} cores)"


def host() -> str:
    return platform.node() or "host"


def save_record(folder: Path, kind: str, record, tag: str = "") -> Path:
    """Write ``record`` as ``folder/<kind>-<date>-<host>[-tag].json``; a second record of the same
    day gets ``-2``, ``-3``, ... (a record is history: never overwritten)."""
    import json
    from datetime import date

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{kind}-{date.today().isoformat()}-{host()}{f'-{tag}' if tag else ''}"
    path, n = folder / f"{stem}.json", 2
    while path.exists():
        path, n = folder / f"{stem}-{n}.json", n + 1
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")
    return path


def engine_set_arguments(doc: str, n: int, seed: int, write: str, out: Path):
    """The command line of a benchmark over the shipped engine sets, each on held-out studies of
    its own protocol (accuracy_sets.py, confidence_reference.py)."""
    import argparse

    from kneebatch.inference.engine_dir import DEFAULT_ENGINES

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", type=Path, default=DEFAULT_ENGINES, help="folder of engine sets")
    ap.add_argument("--sets", nargs="+", default=None, help="sets to measure (default: every set in the folder)")
    ap.add_argument("--n", type=int, default=n, help="held-out studies per set")
    ap.add_argument("--seed", type=int, default=seed)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--write", action="store_true", help=write)
    ap.add_argument("--out", type=Path, default=out)
    return ap.parse_args()


def held_out_per_set(args):
    """For each engine set asked for (``args`` of :func:`engine_set_arguments`): its name, engine
    folder, protocol, the :class:`~kneebatch.training.evaluate.Accuracy` of held-out studies of
    that protocol run through ``run`` with every shipped set, and their measurement rows."""
    import tempfile

    from kneebatch.inference.engine_dir import set_dirs
    from kneebatch.models.engine_sets import CATALOGUE
    from kneebatch.outputs import read_rows
    from kneebatch.training.evaluate import held_out_accuracy

    folders = set_dirs(args.engines)
    for name in args.sets or list(folders):
        protocol = CATALOGUE[name].protocols[0]
        with tempfile.TemporaryDirectory(prefix=f"kneebatch-set-{name}-") as work:
            acc = held_out_accuracy(work, protocol, args.n, args.seed, engines=str(args.engines),
                                    key_file=Path(work) / "k.key", threads=args.threads)
            rows = read_rows(Path(work) / "out" / "measurements.parquet")
        yield name, folders[name], protocol, acc, rows
