"""A batch of studies through the engines: read, segment, paste, save the label maps, measure.

The per-study work of ``kneebatch run`` (:mod:`kneebatch.jobs.run` orchestrates); a task
of the cluster carries one batch, on a worker that holds the engines.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from kneebatch import __version__, ops
from kneebatch.errors import failure_row
from kneebatch.ingest.store import CohortStore
from kneebatch.ingest.visits import study_context
from kneebatch.measure import measure_study

# engines: loading a set (first study that needs it); compile: a compiled engine's first call
# of each shape. Both are one-off costs per worker, kept apart from the per-study stages.
STAGES = ("engines", "compile", "read", "normalize", "coarse", "fine", "paste", "write", "measure")


class Loaded(NamedTuple):
    """A study read and moved to the engines' device, with the channels the engines take."""

    key: str
    channels: list  # the store's roles
    image: object  # [C, Z, Y, X] float32 on the device: every channel, for the measurements
    grid: object
    chosen: object  # the engines' input channels of ``image``
    used: str  # their roles, as the row records them
    engines: object  # the engine set chosen for the study's series (Engines)
    engines_seconds: float  # loading that set, when this study was the first to need it


def _compile_seconds(engines, stage: str) -> float:
    """A compiled engine's first-call seconds so far (0 for the backends that do not compile)."""
    return getattr(getattr(engines, stage), "compile_seconds", 0.0)


def _external_labels(model, study: Loaded, info, xp, device):
    """An external model's label map of one study (on the study's device), or the exception."""
    t = time.perf_counter()
    try:
        labels = model.segment(ops.to_host(study.chosen), study.grid)
        return ops.to_device(labels, xp, device)
    except Exception as e:  # noqa: BLE001 - the study's row says why
        return e
    finally:
        info.seconds.update(fine=time.perf_counter() - t, paste=0.0)


def segmentation_row(key: str, labels, image, grid, channels, info, engines, used: str, **context) -> dict:
    """The measurements row of the label map ``engines`` (an engine set, or another tool's model)
    just made of a study: its QC flags (``sides_unresolved``: the medial/lateral labels left as
    the net gave them; the engines' confidence against their reference), the tissues a model
    does not segment null, and what made the labels."""
    flags = ["sides_unresolved"] if info.sides_found is False else []
    row = measure_study(key, labels, image, grid, channels, "segmentation", flags,
                        covered=getattr(engines, "covered", None), confidence=info.confidence,
                        confidence_reference=getattr(engines, "confidence_reference", None), **context)
    row.update(model_hash=engines.model_hash, label_name=engines.label_name, label_grid="same_grid",
               channels_used=used, engine_set=engines.name)
    return row


def label_attrs(row: dict, engines) -> dict:
    """What a label map carries in the store besides its voxels: what made it, and what ``measure``
    needs to give its row the flags and nulls ``run`` gave (the engines' confidence and its
    reference, the tissues another tool's model segments)."""
    covered = getattr(engines, "covered", None)
    return {"model_hash": engines.model_hash, "engine_set": engines.name, "kneebatch_version": __version__,
            "confidence": {k.removesuffix("_confidence"): v for k, v in row.items() if k.endswith("_confidence")},
            "confidence_reference": getattr(engines, "confidence_reference", None),
            "covered": None if covered is None else sorted(int(i) for i in covered)}


def process_batch(keys: list[str], store_path: str, engines=None, xp=None, device=None) -> dict:
    """Segment, save and measure a batch of studies; never raises.

    ``engines``: an :class:`~kneebatch.inference.engine_dir.EngineSets` (each study gets the set
    its series fit, loaded on first use) or one set's :class:`~kneebatch.inference.engine_dir.Engines`.

    Each study's image goes to the engines' device once (torch tensors; ``xp``/``device``:
    another array namespace and device, as the tests use); segmentation and measurement run
    there, and the label map and one vector of measurements come back.

    Studies go through the engines ``engines.net_batch`` at a time (1 unless set): inputs of
    one shape, such as their coarse volumes, share engine calls (:func:`~kneebatch.inference.
    segment.drive`). Three threads overlap: group *i+1* is read, decompressed and moved to
    the device while the engines work on group *i*, and pasting, saving and measuring group
    *i-1* run beside both, so the engines' cores do not wait for that (mostly single-threaded)
    work. ``seconds["read"]``: the time the engines waited for a read, not the read itself
    (less any engine loading, which is ``seconds["engines"]``).
    """
    from concurrent.futures import ThreadPoolExecutor

    from kneebatch.inference.engine_dir import EngineSets
    from kneebatch.inference.segment import SegmentInfo, fine_stages, paste

    if engines is None:
        from kneebatch.distributed.plugin import worker_engines

        engines = worker_engines()
    # engine sets, or one external model standing in for them (it chooses and loads the same way)
    sets = engines if isinstance(engines, EngineSets) or hasattr(engines, "choose") else EngineSets.of(engines)
    store = CohortStore(store_path, create=False)
    if xp is None:  # every backend takes torch tensors on its device
        xp, device = ops.torch_namespace(), sets.device
    rows, failures = [], []
    seconds = dict.fromkeys(STAGES, 0.0)

    def fail(key, exc):
        failures.append(failure_row(key, "run", exc))

    def finish(key, result, info, image, grid, channels, used, engines):
        external = hasattr(engines, "segment")  # an external model gives whole label maps
        labels = result if external else paste(result, info)
        t = time.perf_counter()
        row = segmentation_row(key, labels, image, grid, channels, info, engines, used, **study_context(store, key))
        t_measure = time.perf_counter() - t
        t = time.perf_counter()
        store.write_labels(key, ops.to_host(labels), label_attrs(row, engines), name=engines.label_name)
        return row, time.perf_counter() - t, t_measure

    def collect(key, future, info):
        try:
            row, t_write, t_measure = future.result()
        except Exception as e:
            fail(key, e)
            return
        rows.append(row)
        seconds["paste"] += info.seconds["paste"]
        seconds["write"] += t_write
        seconds["measure"] += t_measure

    def load(key) -> Loaded | tuple[str, Exception]:
        try:
            channels = store.channels(key)
            name, inputs = sets.choose(channels)  # unsupported_contrast
            t = time.perf_counter()
            engines = sets.get(name)
            engines_seconds = time.perf_counter() - t
            host, grid = store.read_image(key)
            # the one copy in: segmentation and measurement both work on the device
            image = ops.to_device(host.astype(np.float32), xp, device)
            chosen = image if inputs == list(range(image.shape[0])) else xp.stack([image[i, ...] for i in inputs])
            return Loaded(key, channels, image, grid, chosen, "+".join(channels[i] for i in inputs), engines,
                          engines_seconds)
        except Exception as e:  # noqa: BLE001 - the study's row says why
            return key, e

    def load_group(group):
        return [load(key) for key in group]

    # studies go through the nets ``per_call`` at a time: their same-shape inputs share calls
    per_call = sets.net_batch
    groups = [keys[i:i + per_call] for i in range(0, len(keys), per_call)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read") as reader, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish") as finisher:
        pending = []
        ahead = reader.submit(load_group, groups[0]) if groups else None
        for g in range(len(groups)):
            t = time.perf_counter()
            loading, ahead = ahead, reader.submit(load_group, groups[g + 1]) if g + 1 < len(groups) else None
            loaded = loading.result()
            engines_seconds = sum(s.engines_seconds for s in loaded if isinstance(s, Loaded))
            seconds["engines"] += engines_seconds
            seconds["read"] += max(0.0, time.perf_counter() - t - engines_seconds)
            studies = [s for s in loaded if isinstance(s, Loaded)]
            for item in loaded:
                if not isinstance(item, Loaded):
                    fail(*item)
            del loaded
            infos = [SegmentInfo() for _ in studies]
            results = [None] * len(studies)
            for engines in {id(s.engines): s.engines for s in studies}.values():  # a group may mix sets
                mine = [i for i, s in enumerate(studies) if s.engines is engines]
                if hasattr(engines, "segment"):
                    for i in mine:
                        results[i] = _external_labels(engines, studies[i], infos[i], xp, device)
                    continue
                compiling = {stage: _compile_seconds(engines, stage) for stage in ("coarse", "fine")}
                for i, r in zip(mine, fine_stages([studies[i].chosen for i in mine], [studies[i].grid for i in mine],
                                                  engines.coarse, engines.fine, engines.config,
                                                  [infos[i] for i in mine], per_call)):
                    results[i] = r
                for stage, before in compiling.items():  # out of the stage's time, into compile's
                    spent = _compile_seconds(engines, stage) - before
                    seconds[stage] -= spent
                    seconds["compile"] += spent
            for p in pending:
                collect(*p)
            pending = []
            for s, info, result in zip(studies, infos, results):
                if isinstance(result, Exception):
                    fail(s.key, result)
                    continue
                for k, v in info.seconds.items():
                    seconds[k] += v
                pending.append((s.key, finisher.submit(finish, s.key, result, info, s.image, s.grid, s.channels,
                                                       s.used, s.engines), info))
            del studies, results  # the finisher holds what it needs; the next group's read may reuse the memory
        for p in pending:
            collect(*p)
    return {"keys": list(keys), "rows": rows, "failures": failures, "seconds": seconds}


