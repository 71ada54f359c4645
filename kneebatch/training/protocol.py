"""Training an engine set for one protocol family on synthetic studies that took the user's path.

``kneebatch train-synthetic OUT --protocol NAME``: the set's protocols are synthesised (physics
contrasts with each study's own sequence parameters where the protocol varies them, field
strength, noise, bias field, in-plane and slice resolution, ``varied`` anatomy), written as
DICOM, converted into a cohort store exactly as a user's studies are, and the coarse-to-fine
nets are fine-tuned on them from the shipped engines. The first convolution is adapted to the
set's inputs: copied where the channel count is the same, summed over the old channels for a
one-channel set (see :meth:`kneebatch.training.train.Trainer._initialise`).

Everything lands under ``OUT`` (``OUT/data`` holds the cohorts and the store); a rerun resumes:
cohorts already written are kept, studies already in the store are skipped, and training
resumes from its checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

from kneebatch.models.config import ModelConfig
from kneebatch.models.engine_sets import SetSpec

# the acquisition ranges of the training studies: in-plane near the fine net's 0.8 mm working grid
# (finer images are resampled to it anyway), every slice thickness, varied anatomy
TRAIN_PRESET = "train"


def protocol_store(spec: SetSpec, data: Path, n: int, seed: int, workers: int = 1, key_file=None) -> Path:
    """``n`` synthetic studies of ``spec``'s protocols (shared between them), converted into
    ``data/store.zarr`` with their truth as the ``truth`` label maps."""
    from kneebatch.ingest.label_import import import_labels
    from kneebatch.jobs.convert import convert
    from kneebatch.synth.cohort import generate_cohort, ranges_for

    data.mkdir(parents=True, exist_ok=True)
    store = data / "store.zarr"
    key_file = key_file or data / "study.key"
    per = [n // len(spec.protocols) + (i < n % len(spec.protocols)) for i in range(len(spec.protocols))]
    for i, (protocol, count) in enumerate(zip(spec.protocols, per)):
        cohort = data / protocol
        if not (cohort / "manifest.json").exists():
            # a seed of its own per protocol: the same (seed, index) would give two protocols one StudyInstanceUID
            generate_cohort(cohort, count, seed=seed + 1000 * i, ranges=ranges_for(TRAIN_PRESET, protocol, "varied"),
                            workers=workers, progress=None)
        convert(cohort / "dicom", store, key_file=key_file, show_progress=None)
        import_labels(store, cohort / "truth", name="truth")
    return store


def set_config(spec: SetSpec, init_from: Path | None) -> ModelConfig:
    """The nets of ``init_from`` (their design), taking ``spec``'s inputs."""
    cfg = ModelConfig.load(init_from / "model_config.json") if init_from else ModelConfig()
    cfg.input_roles = spec.roles_json()
    cfg.in_channels = len(spec.input_roles)
    cfg.per_series = False
    return cfg


def shipped_t1_t2() -> Path:
    """What a protocol's set starts from by default: the shipped t1-t2 set (or the first set of the
    engines $KNEEBATCH_ENGINES names, when it has no t1-t2)."""
    from kneebatch.inference.engine_dir import engines_dir, set_dirs

    return engines_dir(None, "t1-t2" if "t1-t2" in set_dirs() else None)


def train_protocol(spec: SetSpec, out, n: int = 40, seed: int = 0, volume_seed: int = 3000, init_from=None,
                   minutes_coarse: float = 2.0, minutes_fine: float = 30.0, lr: float = 1e-3, threads: int | None = None,
                   workers: int = 1, device: str = "cpu", batch_size: int = 2, eval_every_fine: int = 50) -> dict:
    from kneebatch.training.train import init_folder, train

    out = Path(out)
    init_from = init_folder(init_from or shipped_t1_t2())
    store = protocol_store(spec, out / "data", n, volume_seed, workers)
    metrics = train(store, out, minutes_coarse=minutes_coarse, minutes_fine=minutes_fine, threads=threads, seed=seed,
                    cfg=set_config(spec, init_from), init_from=init_from, lr=lr, device=device,
                    batch_size=batch_size, eval_every_fine=eval_every_fine)
    metrics["engine_set"] = spec.name
    metrics["protocols"] = list(spec.protocols)
    metrics["data"] = {"n": n, "volume_seed": volume_seed, "preset": TRAIN_PRESET, "anatomy": "varied"}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics
