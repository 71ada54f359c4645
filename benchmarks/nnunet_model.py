"""An nnU-Net v2 model over a cohort: nnU-Net's own command line against ``kneebatch run --model``.

The same model folder (tests/nnunet_model.py's builder: plans and dataset.json as nnU-Net writes
them, the network from nnU-Net's builder, trained a few steps; ``--features`` sizes it) and the
same synthetic studies (the ``small`` preset: sagittal T1 + T2, ~1.1 mm in-plane, 2.5-4 mm
slices), each setting timed from the command line, weights loading included:

- ``nnUNetv2_predict_from_modelfolder`` on NIfTIs of the studies' T1 (as SimpleITK reads the
  store's arrays), its default processes (-npp 3 -nps 3), with and without --disable_tta;
- ``kneebatch run STORE OUT --model DIR`` (a local cluster, the default workers), without and
  with --tta: nnU-Net's own predictor in kneebatch's workers (exact), and ``--backend
  onnxruntime`` (its network on batches of tiles): studies/s, the ratio to nnU-Net's command
  line, and voxel agreement with nnU-Net's labels.

Both tools pay a start-up (imports, processes, the model) that a cohort of 47,000 studies does
not notice, so each setting is timed on cohorts of two sizes made of the same studies (the first
N of one synthetic cohort), and the cost of each further study is the difference over the
difference in size: the ratio a whole cohort sees.

    python benchmarks/nnunet_model.py --n 6 24 [--features 16 32 64]
    python benchmarks/nnunet_model.py --n 6 24 --device cuda --backends torch torch-compile   # a GPU

On a GPU nnU-Net predicts with autocast float16 on the device, as kneebatch's torch backends do.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import machine  # noqa: E402  benchmarks/machine.py


def nifti_inputs(store_path: Path, folder: Path) -> dict[str, tuple]:
    import SimpleITK as sitk

    from kneebatch.ingest.store import CohortStore

    store = CohortStore(store_path, create=False)
    folder.mkdir(parents=True)
    grids = {}
    for n, key in enumerate(store.study_keys()):
        image, grid = store.read_image(key, [store.channels(key).index("T1")])
        itk = sitk.GetImageFromArray(image[0].astype(np.float32))
        itk.SetSpacing(tuple(float(s) for s in reversed(grid.spacing)))
        sitk.WriteImage(itk, str(folder / f"case{n:03d}_0000.nii.gz"))
        grids[f"case{n:03d}"] = (key, grid)
    return grids


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{cmd[0]} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t


def first_studies(dicom: Path, out: Path, n: int) -> Path:
    """A DICOM tree of the cohort's first ``n`` studies (visit/subject folders), hard-linked."""
    studies = sorted(p for p in dicom.glob("*/*") if p.is_dir())[:n]
    for study in studies:
        shutil.copytree(study, out / study.relative_to(dicom), copy_function=os.link)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[6, 24],
                   help="cohort sizes (default 6 24; two or more give the cost of each further study)")
    p.add_argument("--seed", type=int, default=6161)
    p.add_argument("--folds", type=int, default=1)
    p.add_argument("--features", type=int, nargs=3, default=[4, 8, 16], help="the network's stage widths")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"],
                   help="kneebatch backends to time (torch: nnU-Net's predictor unchanged)")
    p.add_argument("--no-tta-only", action="store_true", help="skip the mirrored (8 passes) settings")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()

    import SimpleITK as sitk

    from kneebatch.inference.external import label_lut
    from kneebatch.inference.nnunet import NnUNetFolder
    from kneebatch.ingest.store import CohortStore
    from kneebatch.jobs.convert import convert
    from kneebatch.synth.cohort import PRESETS, generate_cohort
    from tests.nnunet_model import write_model

    bin_dir = Path(sys.executable).parent
    sizes = sorted(set(args.n))
    with tempfile.TemporaryDirectory(prefix="kb-nnunet-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "study.key").write_text("ab" * 32 + "\n")
        generate_cohort(tmp / "cohort", sizes[-1], seed=args.seed, ranges=PRESETS["small"], workers=2)
        model = write_model(tmp / "model", folds=tuple(range(args.folds)), features=args.features)
        lut = label_lut(NnUNetFolder.read(model).dataset["labels"])
        results = []
        for n in sizes:
            base = tmp / f"n{n}"
            convert(first_studies(tmp / "cohort" / "dicom", base / "dicom", n), base / "store.zarr",
                    key_file=tmp / "study.key", show_progress=False)
            cases = nifti_inputs(base / "store.zarr", base / "in")
            for tta in ([False] if args.no_tta_only else [False, True]):
                ref_out = base / f"ref-{tta}"
                cmd = [str(bin_dir / "nnUNetv2_predict_from_modelfolder"), "-i", str(base / "in"), "-o", str(ref_out),
                       "-m", str(model), "-f", *map(str, range(args.folds)), "-device", args.device]
                nnunet_s = timed(cmd + ([] if tta else ["--disable_tta"]))
                for backend in args.backends:
                    store_copy = base / f"store-{tta}-{backend}.zarr"
                    shutil.copytree(base / "store.zarr", store_copy)
                    ours_s = timed([str(bin_dir / "kneebatch"), "run", str(store_copy),
                                    str(base / f"run-{tta}-{backend}"), "--model", str(model), "--backend", backend,
                                    "--device", args.device, "-q"] + (["--tta"] if tta else []))
                    store = CohortStore(store_copy, create=False)
                    same = total = 0
                    for case, (key, _) in cases.items():
                        ref = lut[sitk.GetArrayFromImage(sitk.ReadImage(str(ref_out / f"{case}.nii.gz")))]
                        ours = store.chosen_labels(key, None)[1]
                        same += int(np.sum(ref == ours))
                        total += ref.size
                    results.append({"studies": n, "mirror_tta": tta, "backend": backend,
                                    "nnunet_predict_s": round(nnunet_s, 2), "kneebatch_run_s": round(ours_s, 2),
                                    "nnunet_studies_per_s": round(n / nnunet_s, 3),
                                    "kneebatch_studies_per_s": round(n / ours_s, 3),
                                    "ratio": round(nnunet_s / ours_s, 2), "voxel_agreement": same / total})
                    print(results[-1], flush=True)
    record = {"device": machine.device(args.device), "studies": sizes, "seed": args.seed, "folds": args.folds,
              "model": f"tests/nnunet_model.py (PlainConvUNet {'-'.join(map(str, args.features))} features, "
                       "patch 16x32x32, 3.5 x 1 x 1 mm)",
              "preset": "small", "results": results, "per_further_study": per_further_study(results, sizes)}
    for row in record["per_further_study"]:
        print(row)
    print(machine.save_record(args.out, "nnunet-model", record))


def per_further_study(results: list[dict], sizes: list[int]) -> list[dict]:
    """Seconds each further study costs, smallest to largest cohort, and their ratio."""
    if len(sizes) < 2:
        return []
    small, big = sizes[0], sizes[-1]
    rows = []
    for r in results:
        if r["studies"] != big:
            continue
        s = next(x for x in results if x["studies"] == small and x["mirror_tta"] == r["mirror_tta"]
                 and x["backend"] == r["backend"])
        nnunet = (r["nnunet_predict_s"] - s["nnunet_predict_s"]) / (big - small)
        ours = (r["kneebatch_run_s"] - s["kneebatch_run_s"]) / (big - small)
        rows.append({"mirror_tta": r["mirror_tta"], "backend": r["backend"], "nnunet_s_per_study": round(nnunet, 3),
                     "kneebatch_s_per_study": round(ours, 3), "ratio": round(nnunet / ours, 2)})
    return rows


if __name__ == "__main__":
    main()
