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
