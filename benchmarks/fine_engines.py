"""The fine net alone, per engine variant, on the crops real studies give it.

    python benchmarks/fine_engines.py [--n 6] [--engines DIR] [--calibrate 4]

Synthetic clinical studies (seed 93) are converted and run through the coarse stage; the
fine net's input crops are kept. Then, on the same crops, in one process, timed after
one untimed call per crop (so compile time is reported apart):

* ONNX Runtime, float32 (the CPU default);
* ONNX Runtime, static int8 (QDQ, per-channel int8 weights, uint8 activations),
  calibrated on the first ``--calibrate`` crops and timed on the others;
* torch eager, float32;
* torch.compile (Inductor, frozen weights) with crops padded to the engines' static buckets,
  as ``--backend torch-compile`` runs them.

Each variant's voxel agreement (argmax) with ONNX Runtime float32 is reported beside its
time. Writes ``benchmarks/results/fine-engines-<date>-<host>.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import machine  # benchmarks/machine.py

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--calibrate", type=int, default=4)
    ap.add_argument("--engines", default=None)
    ap.add_argument("--seed", type=int, default=93)
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from kneebatch.inference.engine_dir import engines_dir, load_engines, read_manifest
    from kneebatch.inference.segment import SegmentInfo, fine_stage
    from kneebatch.ingest.store import CohortStore
    from kneebatch.jobs.convert import convert
    from kneebatch.models.preprocess import pad_to_multiple
    from kneebatch.synth.cohort import generate_cohort

    work = Path(tempfile.mkdtemp(prefix="kneebatch-fine-bench-"))
    try:
        generate_cohort(work / "cohort", args.n, seed=args.seed, workers=2)
        convert(work / "cohort" / "dicom", work / "store.zarr", key_file=work / "k.key", show_progress=False)
        store = CohortStore(work / "store.zarr")
        eager = load_engines(args.engines, "torch")
        crops = []

        class Keep:  # the fine engine, recording its inputs
            device = eager.fine.device

            def __call__(self, x):
                crops.append(x.numpy().copy())
                return eager.fine(x)

        for key in store.study_keys():
            image, grid = store.read_image(key, eager.config.input_channels(store.channels(key)))
            fine_stage(torch.from_numpy(image.astype(np.float32)), grid, eager.coarse, Keep(), eager.config,
                       SegmentInfo())
        timed = crops[args.calibrate:]
        root = engines_dir(args.engines)
        onnx_path = root / read_manifest(args.engines)["fine"]["onnx"]
        quant_pre_process(str(onnx_path), str(work / "fine.pre.onnx"), skip_symbolic_shape=True)

        class Calibration(CalibrationDataReader):
            def __init__(self):
                self.left = iter(crops[:args.calibrate])

            def get_next(self):
                c = next(self.left, None)
                return None if c is None else {"image": c}

        quantize_static(str(work / "fine.pre.onnx"), str(work / "fine.int8.onnx"), Calibration(),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True)
        threads = torch.get_num_threads()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads

        def session(path):
            s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            return lambda x: torch.from_numpy(s.run(None, {"image": x.numpy()})[0])

        compiled = load_engines(args.engines, "torch-compile").fine
        divisor = eager.config.fine.divisor()

        def bucketed(x):
            shape = tuple(x.shape[2:])
            xb, _ = pad_to_multiple(x, compiled.input_shape(shape, divisor), mode="replicate")
            return compiled(xb)[:, :, :shape[0], :shape[1], :shape[2]]

        variants = {"onnxruntime fp32": session(onnx_path), "onnxruntime int8 (static, QDQ)": session(
            work / "fine.int8.onnx"), "torch eager fp32": eager.fine, "torch.compile fp32 (frozen, buckets)": bucketed}
        records, reference = [], None
        for name, run in variants.items():
            first, seconds, labels = 0.0, 0.0, []
            for c in timed:
                x = torch.from_numpy(c)
                t = time.perf_counter()
                run(x)
                first += time.perf_counter() - t
                t = time.perf_counter()
                out = run(x)
                seconds += time.perf_counter() - t
                labels.append(out[0].argmax(0))
            reference = reference or labels
            agree = float(np.mean([(a == b).float().mean().item() for a, b in zip(labels, reference)]))
            records.append({"engine": name, "seconds_per_crop": round(seconds / len(timed), 3),
                            "first_call_seconds_per_crop": round(first / len(timed), 2),
                            "voxel_agreement_with_onnxruntime_fp32": round(agree, 5)})
            print(json.dumps(records[-1]), flush=True)
        result = {"device": machine.device("cpu"), "date": date.today().isoformat(), "threads": threads,
                  "crops": [list(c.shape[2:]) for c in timed], "calibration_crops": args.calibrate,
                  "variants": records}
        machine.save_record(args.out, "fine-engines", result)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
