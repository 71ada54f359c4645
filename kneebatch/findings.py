"""``kneebatch stats``: a job's measurements joined with a pseudonymous clinical table ->
cohort table, group comparison, trend along a grade, change per year, and their figures."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from kneebatch import plots, stats
from kneebatch.outputs import claim_output_dir, write_text_atomic

# the measurements the method's paper compares, and what cohorts follow: shown in figures
KEY_MEASURES = ["effusion_volume_ml", "total_muscle_volume_ml", "total_cartilage_volume_ml",
                "femoral_cartilage_thickness_mean_mm", "medial_tibial_cartilage_thickness_mean_mm",
                "patellar_cartilage_thickness_mean_mm"]


@dataclass
class StatsSettings:
    by: str = "group"
    reference: str | None = None
    measures: list[str] | None = None  # default: stats.default_measures
    adjust: list[str] = field(default_factory=list)
    trend: str | None = None
    longitudinal: bool = False
    plots: bool = True


def load(out, clinical=None) -> pd.DataFrame:
    """The job's measurements (``OUT/measurements.parquet``) joined with ``clinical``."""
    path = Path(out) / "measurements.parquet"
    if not path.exists():
        raise FileNotFoundError(f"no {path}: give the output folder of kneebatch run or measure (merged if sharded)")
    df = pd.read_parquet(path)
    clin = pd.read_parquet(clinical) if clinical else None
    return stats.join(df, clin)


def run_stats(out, clinical=None, dest=None, settings: StatsSettings | None = None) -> dict:
    """Write the tables (Parquet, CSV, Markdown) and figures (PNG, SVG) to ``dest`` (default
    ``OUT/stats``). Returns what was written and the headline numbers."""
    s = settings or StatsSettings()
    df = load(out, clinical)
    if df.empty:
        raise ValueError("no measurement row matched the clinical table: were both made from the same store and key?")
    if s.by not in df:
        hint = "" if clinical else " (no --clinical table given: make one with kneebatch clinical)"
        raise ValueError(f"no column {s.by!r} to group by{hint}; the table has: "
                         f"{', '.join(c for c in df.columns if not c.endswith(('_mm3', '_ml', '_mm', '_mean')))}")
    measures = s.measures or stats.default_measures(df)
    missing = [m for m in measures if m not in df]
    if missing:
        raise ValueError(f"no such measurement column: {', '.join(missing)} (see kneebatch columns)")
    for c in s.adjust:
        if c not in df:
            raise ValueError(f"no column {c!r} to adjust for")
    dest = claim_output_dir(Path(dest) if dest else Path(out) / "stats", "stats", {})
    written = []
    cross = stats.first_visits(df)  # the cross-sectional tables: one study per subject
    summary = {"studies": len(df), "studies_compared": len(cross), "by": s.by, "measures": len(measures),
               "not_segmented": stats.not_segmented(df)}
    cohort = stats.cohort_table(cross, s.by)
    written += stats.write_table(cohort, dest, "cohort", f"Cohort by {s.by}")
    comparison = stats.compare_groups(cross, s.by, measures, s.reference, s.adjust or None)
    written += stats.write_table(comparison, dest, "comparison", f"Measurements by {s.by}")
    summary["comparisons"] = len(comparison)
    order = [g for g, _ in stats.groups(df, s.by, s.reference)]
    shown = [m for m in KEY_MEASURES if m in measures] or measures[:6]
    if s.plots:
        written += plots.save(plots.by_group(cross, s.by, shown, order), dest, "by_group")
    if s.trend:
        tr = stats.trend(cross, s.trend, measures)
        written += stats.write_table(tr, dest, "trend", f"Trend along {s.trend}")
        if s.plots:
            written += plots.save(plots.along_grade(cross, s.trend, shown), dest, f"by_{s.trend}")
    if s.longitudinal:
        slopes, mixed = stats.longitudinal(df, s.by, measures, s.reference)
        written += stats.write_table(slopes.per_subject, dest, "change_per_subject", "Change per year, per subject")
        written += stats.write_table(slopes.comparison, dest, "change_by_group", f"Change per year by {s.by}")
        if len(mixed):
            written += stats.write_table(mixed, dest, "change_mixed_model",
                                         f"Mixed model: measure ~ years * {s.by}, random intercept per subject")
        summary["subjects_with_visits"] = int(slopes.per_subject["subject_key"].nunique())
        if s.plots:
            written += plots.save(plots.trajectories(df, s.by, shown, order), dest, "trajectories")
    summary["files"] = [str(p.relative_to(dest)) for p in written]
    write_text_atomic(dest / "stats.json", json.dumps({"settings": s.__dict__, **summary}, indent=1, default=str))
    summary["dest"] = str(dest)
    summary["comparison"] = comparison
    return summary
