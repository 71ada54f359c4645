"""Weights as safetensors (never pickle), with the config and metrics as JSON metadata."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from kneebatch.outputs import sha256_file  # noqa: F401  (the engines' and publish's import)


def save_weights(path, state: dict, metadata: dict | None = None, dtype: torch.dtype | None = None) -> str:
    """Write tensors (optionally cast floats to ``dtype``) atomically; returns the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in state.items():
        v = v.detach().cpu().contiguous()
        if dtype is not None and v.is_floating_point():
            cast = v.to(dtype)
            if bool(torch.isfinite(cast).all()):  # outside dtype's range (a batch norm's running variance): kept
                v = cast
        tensors[k] = v
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"kneebatch": json.dumps(metadata or {})})
    tmp.replace(path)
    return sha256_file(path)


def load_weights(path, dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("kneebatch", "{}"))
    return state, meta
