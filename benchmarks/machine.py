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
