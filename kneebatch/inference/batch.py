"""A batch of studies through the engines: read, segment, paste, save the label maps, measure.

The per-study work of ``kneebatch run`` (:mod:`kneebatch.jobs.run` orchestrates); a task
of the cluster carries one batch, on a worker that holds the engines.
"""

from __future__ import annotations

import time

import numpy as np

from kneebatch import __version__
from kneebatch.errors import failure_row
from kneebatch.ingest.store import CohortStore
from kneebatch.ingest.visits import study_context
from kneebatch.measure import measure_study

STAGES = ("read", "normalize", "coarse", "fine", "paste", "write", "measure")


def process_batch(keys: list[str], store_path: str, engines=None) -> dict:
    """Segment, save and measure a batch of studies; never raises.

    Pasting, saving and measuring study *i* run on a second thread while the engines
    work on study *i+1*, so the engines' cores do not wait for that (mostly
    single-threaded) work; at most one study is being finished at a time.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from kneebatch.inference.segment import SegmentInfo, fine_stage, paste

    if engines is None:
        from kneebatch.distributed.plugin import worker_engines

        engines = worker_engines()
    store = CohortStore(store_path, create=False)
    rows, failures = [], []
    seconds = dict.fromkeys(STAGES, 0.0)

    def fail(key, exc):
        failures.append(failure_row(key, "run", exc))

    def finish(key, result, info, image, grid, used):
        labels = paste(result, info)
        image = torch.from_numpy(image).to(labels.device)  # measured beside the labels
        t = time.perf_counter()
        store.write_labels(key, labels.cpu().numpy(), {"model_hash": engines.model_hash,
                                                       "kneebatch_version": __version__},
                           name=engines.label_name)
        t_write = time.perf_counter() - t
        t = time.perf_counter()
        # sides_unresolved: medial/lateral labels as the net gave them
        flags = ["sides_unresolved"] if info.sides_found is False else []
        row = measure_study(key, labels, image, grid, store.channels(key), "segmentation", flags,
                            **study_context(store, key))
        row.update(model_hash=engines.model_hash, label_name=engines.label_name, label_grid="same_grid",
                   channels_used=used)
        return row, t_write, time.perf_counter() - t

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

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish") as finisher:
        pending = None
        for key in keys:
            try:
                t = time.perf_counter()
                channels = store.channels(key)
                inputs = engines.config.input_channels(channels)  # unsupported_contrast
                image, grid = store.read_image(key)
                image = image.astype(np.float32)
                seconds["read"] += time.perf_counter() - t
                info = SegmentInfo()
                result = fine_stage(image[inputs], grid, engines.coarse, engines.fine, engines.config, info)
                for k, v in info.seconds.items():
                    seconds[k] += v
            except Exception as e:
                fail(key, e)
                continue
            if pending is not None:
                collect(*pending)
            used = "+".join(channels[i] for i in inputs)
            pending = key, finisher.submit(finish, key, result, info, image, grid, used), info
        if pending is not None:
            collect(*pending)
    return {"keys": list(keys), "rows": rows, "failures": failures, "seconds": seconds}


