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

    python benchmarks/nnunet_model.py --n 6 [--features 16 32 64]
    python benchmarks/nnunet_model.py --n 6 --device cuda --backends torch torch-compile   # a GPU

On a GPU nnU-Net predicts with autocast float16 on the device, as kneebatch's torch backends do.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=6, help="studies (default 6)")
    p.add_argument("--seed", type=int, default=6161)
    p.add_argument("--folds", type=int, default=1)
    p.add_argument("--features", type=int, nargs=3, default=[4, 8, 16], help="the network's stage widths")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"],
                   help="kneebatch's ways of running the model (torch: nnU-Net's own predictor)")
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
    with tempfile.TemporaryDirectory(prefix="kb-nnunet-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "study.key").write_text("ab" * 32 + "\n")
        generate_cohort(tmp / "cohort", args.n, seed=args.seed, ranges=PRESETS["small"], workers=2)
        convert(tmp / "cohort" / "dicom", tmp / "store.zarr", key_file=tmp / "study.key", show_progress=False)
        model = write_model(tmp / "model", folds=tuple(range(args.folds)), features=args.features)
        lut = label_lut(NnUNetFolder.read(model).dataset["labels"])
        cases = nifti_inputs(tmp / "store.zarr", tmp / "in")
        results = []
        for tta in ([False] if args.no_tta_only else [False, True]):
            ref_out = tmp / f"ref-{tta}"
            cmd = [str(bin_dir / "nnUNetv2_predict_from_modelfolder"), "-i", str(tmp / "in"), "-o", str(ref_out),
                   "-m", str(model), "-f", *map(str, range(args.folds)), "-device", args.device]
            nnunet_s = timed(cmd + ([] if tta else ["--disable_tta"]))
            for backend in args.backends:
                store_copy = tmp / f"store-{tta}-{backend}.zarr"
                shutil.copytree(tmp / "store.zarr", store_copy)
                ours_s = timed([str(bin_dir / "kneebatch"), "run", str(store_copy), str(tmp / f"run-{tta}-{backend}"),
                                "--model", str(model), "--backend", backend, "--device", args.device, "-q"]
                               + (["--tta"] if tta else []))
                store = CohortStore(store_copy, create=False)
                same = total = 0
                for case, (key, _) in cases.items():
                    ref = lut[sitk.GetArrayFromImage(sitk.ReadImage(str(ref_out / f"{case}.nii.gz")))]
                    ours = store.chosen_labels(key, None)[1]
                    same += int(np.sum(ref == ours))
                    total += ref.size
                results.append({"mirror_tta": tta, "backend": backend, "nnunet_predict_s": round(nnunet_s, 2),
                                "kneebatch_run_s": round(ours_s, 2),
                                "nnunet_studies_per_s": round(args.n / nnunet_s, 3),
                                "kneebatch_studies_per_s": round(args.n / ours_s, 3),
                                "ratio": round(nnunet_s / ours_s, 2), "voxel_agreement": same / total})
                print(results[-1], flush=True)
    record = {"device": machine.device(args.device), "studies": args.n, "seed": args.seed, "folds": args.folds,
              "model": f"tests/nnunet_model.py (PlainConvUNet {'-'.join(map(str, args.features))} features, "
                       "patch 16x32x32, 3.5 x 1 x 1 mm)",
              "preset": "small", "results": results}
    print(machine.save_record(args.out, "nnunet-model", record))


if __name__ == "__main__":
    main()
