"""``kneebatch export-engines``: a training run -> the engines folder the pipeline loads.

Copies the best weights (safetensors, fp16), exports both networks to ONNX (dynamic
batch and spatial axes, opset 17, legacy exporter: no onnxscript needed), checks the
ONNX outputs against torch, and writes ``engines.json`` with every file's sha256.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from kneebatch.inference.engine_dir import SETS_INDEX
from kneebatch.models.checkpoints import load_weights, sha256_file
from kneebatch.models.config import ModelConfig, build_network
from kneebatch.models.onnx_export import export_onnx


def publish(train_dir, engines_dir, training_note: dict | None = None) -> dict:
    """Write one engine set into ``engines_dir``. Inside a folder of sets (its parent has a
    ``sets.json``) the set joins that list, last, so ``run`` chooses it for the studies it fits."""
    import onnxruntime as ort

    train_dir, engines_dir = Path(train_dir), Path(engines_dir)
    if (engines_dir / SETS_INDEX).exists():
        raise ValueError(f"{engines_dir} is a folder of engine sets: export into {engines_dir}/<set name>")
    engines_dir.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.load(train_dir / "model_config.json")
    shutil.copy(train_dir / "model_config.json", engines_dir / "model_config.json")
    # the config changes the label maps as the weights do: its hash is checked like theirs
    manifest = {"config": "model_config.json", "config_sha256": sha256_file(engines_dir / "model_config.json")}
    for stage in ("coarse", "fine"):
        net = cfg.coarse if stage == "coarse" else cfg.fine
        weights = engines_dir / f"{stage}.safetensors"
        shutil.copy(train_dir / f"{stage}.safetensors", weights)
        model = build_network(net, cfg.in_channels, cfg.n_classes)
        state, meta = load_weights(weights)
        model.load_state_dict(state)
        model.eval()
        shape = [1, cfg.in_channels, *(cfg.coarse_shape if stage == "coarse" else cfg.fine_patch)]
        onnx_path = engines_dir / f"{stage}.onnx"
        export_onnx(model, onnx_path, shape)
        x = torch.randn(*shape)
        with torch.inference_mode():
            ref = model(x).numpy()
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"image": x.numpy()})[0]
        max_diff = float(np.abs(ref - got).max())
        if max_diff > 1e-2:
            raise RuntimeError(f"ONNX export of the {stage} network differs from torch by {max_diff}")
        manifest[stage] = {
            "safetensors": weights.name,
            "onnx": onnx_path.name,
            "sha256": {weights.name: sha256_file(weights), onnx_path.name: sha256_file(onnx_path)},
            "val_score": meta.get("val_score"),
            "step": meta.get("step"),
            "onnx_max_abs_diff": max_diff,
        }
    for extra in ("metrics.json", "train_log.csv", "train_curves.png"):
        if (train_dir / extra).exists():
            shutil.copy(train_dir / extra, engines_dir / extra)
    manifest["training"] = training_note or {}
    (engines_dir / "engines.json").write_text(json.dumps(manifest, indent=1))
    _write_training_card(engines_dir, manifest)
    index = engines_dir.parent / SETS_INDEX
    if index.exists():
        sets = json.loads(index.read_text())
        if engines_dir.name not in sets["sets"]:
            sets["sets"].append(engines_dir.name)
            index.write_text(json.dumps(sets, indent=1) + "\n")
    return manifest


def _write_training_card(engines_dir: Path, manifest: dict) -> None:
    """``TRAINING.md``: how the engines were made and how well they do on held-out studies."""
    metrics_path = engines_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    note = manifest.get("training", {})
    lines = ["# Engines", "", "Made by kneebatch's own training; reproduce with:", "", "```"]
    lines += note.get("commands", [note["command"]] if "command" in note else [])
    lines += ["```", ""]
    for key in ("data", "machine"):
        if key in note:
            lines += [f"- {key}: {note[key]}"]
    if metrics:
        lines += [f"- split (studies): {metrics['split']}", f"- seed: {metrics['seed']}",
                  f"- time budget (minutes): {metrics['minutes']}", ""]
        lines += ["Test-split Dice (full pipeline, native grid):", "", "| label | Dice |", "| --- | --- |"]
        lines += [f"| {k} | {v:.3f} |" for k, v in metrics["test_dice"].items()]
        lines += [f"| **mean** | **{metrics['test_mean_dice']:.3f}** |", ""]
    for stage in ("coarse", "fine"):
        e = manifest[stage]
        lines += [f"- {stage}: best validation score {e['val_score']:.3f} at step {e['step']}; "
                  f"ONNX vs torch max abs diff {e['onnx_max_abs_diff']:.1e}"]
    (engines_dir / "TRAINING.md").write_text("\n".join(lines) + "\n")
