"""``kneebatch demo``: synthetic normal-vs-OA cohort -> store -> coarse-to-fine
segmentation with the shipped engines -> measurements -> group table, plus the
segmentation's Dice against the generator's ground truth.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

TABLE_COLUMNS = [
    ("effusion_volume_ml", "effusion (mL)"),
    ("total_muscle_volume_ml", "muscle in FOV (mL)"),
    ("femoral_cartilage_thickness_mean_mm", "femoral cart. (mm)"),
    ("medial_tibial_cartilage_thickness_mean_mm", "medial tibial cart. (mm)"),
    ("lateral_tibial_cartilage_thickness_mean_mm", "lateral tibial cart. (mm)"),
    ("patellar_cartilage_thickness_mean_mm", "patellar cart. (mm)"),
]


def run_demo(out: Path, n: int = 24, seed: int = 2024, preset: str = "clinical", workers: int | None = None,
             show_progress: bool | None = None, truth: bool = False, backend: str = "onnxruntime") -> int:
    from kneebatch.clinical import pseudonymise_clinical
    from kneebatch.distributed.cluster import dask_client, default_workers
    from kneebatch.findings import StatsSettings, run_stats
    from kneebatch.jobs.convert import convert
    from kneebatch.jobs.measure import measure_store
    from kneebatch.jobs.run import run
    from kneebatch.report import build_report
    from kneebatch.synth.cohort import generate_cohort

    console = Console()
    workers = workers or default_workers()
    cohort, store = out / "cohort", out / "store"
    results = out / ("results-truth" if truth else f"results-{backend}")
    t0 = time.perf_counter()
    if not (cohort / "manifest.json").exists():
        console.print(f"[bold]1/3[/] synthesising {n} studies ({preset}) -> {cohort}")
        generate_cohort(cohort, n, seed=seed, preset=preset, workers=workers, progress=show_progress)
    else:
        console.print(f"[bold]1/3[/] synthetic cohort already in {cohort}")
    with dask_client("local", n_workers=workers) as client:
        console.print(f"[bold]2/3[/] converting DICOM -> {store}")
        rc = convert(cohort / "dicom", store, client=client, key_file=out / "study.key", show_progress=show_progress)
        console.print(f"      {rc.converted} converted, {rc.already_done} already there, {rc.failed} failed "
                      f"({rc.studies_per_s:.2f} studies/s)")
        if truth:
            console.print(f"[bold]3/3[/] measuring ground-truth label maps -> {results}")
            rm = measure_store(store, results, labels_dir=cohort / "truth", client=client,
                               show_progress=show_progress)
            failed = rm.failed + rm.carried_failures
        else:
            console.print(f"[bold]3/3[/] segmenting (coarse -> fine U-Net, {backend}) and measuring -> {results}")
            rr = run(store, results, backend=backend, client=client, show_progress=show_progress)
            console.print(f"      {rr.segmented} segmented, {rr.already_done} already done, {rr.failed} failed "
                          f"({rr.studies_per_s:.2f} studies/s)")
            failed = rr.failed + rr.carried_failures
    # the analyst's side: identifiers replaced by keys, then the paper's comparison and a report
    clinical = pseudonymise_clinical(store, cohort / "clinical.csv", results / "clinical.parquet",
                                     key_file=out / "study.key")
    summary = run_stats(results, results / "clinical.parquet",
                        settings=StatsSettings(measures=[c for c, _ in TABLE_COLUMNS]))
    comparison = summary["comparison"].set_index("measure")

    source = "ground-truth labels" if truth else "automatic segmentation"
    table = Table(title=f"Normal vs OA ({summary['studies']} studies, {source})")
    table.add_column("measure")
    for side in ("reference", "group"):
        table.add_column(f"{comparison[side].iloc[0] if side == 'group' else comparison['reference'].iloc[0]} "
                         "mean ± SD (n)", justify="right")
    table.add_column("Mann-Whitney p", justify="right")
    table.add_column("Welch p", justify="right")
    for column, title in TABLE_COLUMNS:
        e = comparison.loc[column]
        cells = [f"{e[f'{side}_mean']:.2f} ± {e[f'{side}_sd']:.2f} ({e[f'{side}_n']})" for side in ("reference", "group")]
        table.add_row(title, *cells, f"{e['mannwhitney_p']:.3g}", f"{e['welch_p']:.3g}")
    console.print(table)
    report = build_report(results, store=store, clinical=results / "clinical.parquet", meshes=3)
    if not truth:
        dice = _dice_by_group(store, cohort / "truth")
        if dice:
            console.print("segmentation Dice vs ground truth (mean over studies): " +
                          ", ".join(f"{k} {v:.2f}" for k, v in dice.items()))
    console.print(f"{summary['studies']} studies measured, {failed} failed, {time.perf_counter() - t0:.0f} s in all")
    console.print(f"outputs: {results / 'measurements.parquet'}, {results / 'failures.parquet'}, "
                  f"{results / 'stats'}/ (tables, figures), {report} ({clinical.rows} clinical rows joined by key); "
                  f"store: {store}")
    return 0


def _dice_by_group(store_path: Path, truth_dir: Path) -> dict[str, float]:
    """Mean Dice per tissue group of the store's label maps against the synthetic truth."""
    import numpy as np

    from kneebatch import labels as L
    from kneebatch.training.evaluate import dice_against_truth

    groups: dict[str, list[float]] = {}
    for name, dices in dice_against_truth(store_path, truth_dir)[0].items():
        groups.setdefault(L.by_name(name).group, []).extend(dices)
    return {g: float(np.mean(v)) for g, v in groups.items()}

