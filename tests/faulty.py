"""Fault injection for tests: batch functions that kill the worker process running them."""

from __future__ import annotations

import os
from pathlib import Path

from kneebatch.jobs.convert import convert_batch
from kneebatch.jobs.segment import process_batch


def crash_on(keys, store_path, engines=None, poison: str = ""):
    """Dies (like an out-of-memory kill) whenever its batch holds the poison study."""
    if poison in keys:
        os._exit(137)
    return process_batch(keys, store_path, engines)


def crash_once(keys, store_path, engines=None, victim: str = "", marker: str = ""):
    """Dies the first time it meets ``victim`` (a worker lost mid-batch), then works."""
    if victim in keys and not Path(marker).exists():
        Path(marker).write_text("crashed")
        os._exit(137)
    return process_batch(keys, store_path, engines)


def crash_converting(pairs, store_path, poison: str = ""):
    """Dies whenever it converts the poison study (a decoder that crashes the process)."""
    if any(key == poison for key, _ in pairs):
        os._exit(137)
    return convert_batch(pairs, store_path)
