"""A PROJECTION (not a measurement) of ``kneebatch run`` on an NVIDIA H100 node, from what
can be measured here: each study's bytes in the store, the shapes the engines see, and
the engines' floating-point operations at those shapes.

    python benchmarks/gpu_projection.py STORE [--n 8] [--engines DIR]

Per study, measured on this machine (CPU, the shipped engines):

* bytes read: the study's compressed chunks on disk, and its uint16 image in memory;
* the coarse input (fixed) and the fine net's working-grid crop (from the coarse stage
  run here, as ``run`` does), per series for one-channel engines;
* FLOPs of the coarse and fine nets at those shapes (``torch.utils.flop_counter`` on
  the meta device: counted, not timed; a multiply-add is 2 FLOPs);
* the host-side seconds per study a GPU worker still spends on the CPU today (the
  measurements' k-d tree distances, compressing the label map), timed on one core here.

Assumed, stated in the output, never measured here: the H100 SXM's dense FP16 tensor
peak (989.4 TFLOP/s, NVIDIA's datasheet), the fraction of it small-channel 3-D
convolutions reach (a range: 10 % and 30 %), HBM bandwidth (3.35 TB/s), and the node's
store read rate (zstd decoded on the CPU at the rate measured here per core, times the
cores per GPU). Writes ``benchmarks/results/gpu-projection-<date>-<host>.json``; a GPU
measurement replaces it when a device is lent (``run_throughput.py --device cuda``).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import machine  # benchmarks/machine.py

ROOT = Path(__file__).resolve().parent
H100 = {"fp16_dense_tflops": 989.4, "hbm_tb_s": 3.35, "gpus_per_node": 8, "cpu_cores_per_gpu": 12}
UTILISATION = (0.10, 0.30)  # of the FP16 peak, for 3-D convolutions with 8-128 channels


def flops(net_cfg, in_channels: int, n_classes: int, shape) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from kneebatch.models.config import build_network

    with torch.device("meta"):
        model = build_network(net_cfg, in_channels, n_classes).eval()
        x = torch.zeros((1, in_channels, *shape))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return float(counter.get_total_flops())


def study_bytes_on_disk(store_path: Path, key: str) -> int:
    return sum(p.stat().st_size for p in (store_path / key / "image").rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", type=Path)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--engines", default=None)
    ap.add_argument("--tag", default="", help="in the result's file name, e.g. the protocol")
    args = ap.parse_args()

    import numpy as np
    import torch
    from numcodecs import Blosc

    from kneebatch.inference.engine_dir import load_engines
    from kneebatch.inference.segment import SegmentInfo, fine_stage, paste
    from kneebatch.ingest.store import CohortStore
    from kneebatch.measure import measure_study

    store = CohortStore(args.store, create=False)
    codec = Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE)  # the store's label codec
    engines = load_engines(args.engines)
    cfg = engines.config
    coarse_shape = [int(-(-s // d) * d) for s, d in zip(cfg.coarse_shape, cfg.coarse.divisor())]
    coarse_flops = flops(cfg.coarse, cfg.in_channels, cfg.n_classes, coarse_shape)
    studies, t_read = [], 0.0
    for key in store.study_keys()[: args.n]:
        t = time.perf_counter()
        image, grid = store.read_image(key)
        t_read += time.perf_counter() - t
        info = SegmentInfo()
        x = torch.from_numpy(image.astype(np.float32))
        result = fine_stage(x, grid, engines.coarse, engines.fine, cfg, info)
        labels = paste(result, info)
        # host-side seconds on one core: the measurements (k-d tree thickness; on a GPU they
        # now run on the device) and compressing the label map for the store
        t = time.perf_counter()
        measure_study(key, labels, x, grid, store.channels(key), "segmentation")
        t_measure = time.perf_counter() - t
        t = time.perf_counter()
        codec.encode(np.ascontiguousarray(labels.numpy()))
        t_compress = time.perf_counter() - t
        work = [int(-(-s // d) * d) for s, d in zip(info.working_shape, cfg.fine.divisor())]
        passes = image.shape[0] if cfg.per_series else 1  # one-channel engines: a pass per series
        fine_flops = passes * flops(cfg.fine, cfg.in_channels, cfg.n_classes, work)
        studies.append({"shape_czyx": list(image.shape), "image_bytes": int(image.nbytes),
                        "disk_bytes": study_bytes_on_disk(store.path, key), "working_shape": work,
                        "passes": passes, "coarse_gflop": passes * coarse_flops / 1e9, "fine_gflop": fine_flops / 1e9,
                        "logit_bytes_fp16": 2 * cfg.n_classes * int(np.prod(work)),
                        "host_measure_s": t_measure, "host_compress_s": t_compress})
    mean = {k: float(np.mean([s[k] for s in studies])) for k in
            ("image_bytes", "disk_bytes", "coarse_gflop", "fine_gflop", "logit_bytes_fp16", "host_measure_s",
             "host_compress_s")}
    decode_mb_s = sum(s["image_bytes"] for s in studies) / 1e6 / t_read  # one core, this machine

    flop = (mean["coarse_gflop"] + mean["fine_gflop"]) * 1e9
    projection = []
    for u in UTILISATION:
        compute_s = flop / (H100["fp16_dense_tflops"] * 1e12 * u)
        # the logits are written once and read ~4 times (mirror, upsample, argmax, paste)
        memory_s = 5 * mean["logit_bytes_fp16"] / (H100["hbm_tb_s"] * 1e12)
        read_s = mean["image_bytes"] / (decode_mb_s * 1e6 * H100["cpu_cores_per_gpu"])
        host_s = (mean["host_measure_s"] + mean["host_compress_s"]) / H100["cpu_cores_per_gpu"]
        stages = {"gpu": compute_s + memory_s, "store read": read_s, "host measure + compress": host_s}
        per_gpu = 1.0 / max(stages.values())  # the stages overlap (prefetch, a second thread): the slowest bounds
        projection.append({"fp16_utilisation": u, "compute_s_per_study": compute_s, "hbm_s_per_study": memory_s,
                           "read_s_per_study": read_s, "host_s_per_study": host_s,
                           "bound": max(stages, key=stages.get),
                           "studies_per_s_per_gpu": per_gpu,
                           "studies_per_s_per_node": per_gpu * H100["gpus_per_node"],
                           "oai_47000_dess_hours_per_node": 47000 / (per_gpu * H100["gpus_per_node"]) / 3600})
    record = {"kind": "PROJECTION, not a measurement", "date": date.today().isoformat(), "machine": machine.device("cpu"),
              "store": str(args.store), "studies": studies, "mean": mean,
              "measured_here": {"store_read_decode_mb_s_one_core": decode_mb_s,
                                "coarse_gflop_per_pass": coarse_flops / 1e9},
              "assumed": {**H100, "fp16_utilisation_range": UTILISATION}, "projection": projection}
    print(json.dumps({"mean": mean, "decode_mb_s_one_core": decode_mb_s, "projection": projection}, indent=1))
    machine.save_record(ROOT / "results", "gpu-projection", record, args.tag or "")


if __name__ == "__main__":
    main()
