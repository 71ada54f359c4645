"""Cohort statistics: measurements joined with clinical data, compared between groups."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from scipy import stats as sps


def join_clinical(measurements: list[dict], keymap: list[dict], clinical: list[dict],
                  uid_column: str = "study_uid") -> list[dict]:
    """Measurement rows with the clinical columns of their study (matched through the keymap).

    The joined rows carry no identifiers: ``uid_column`` and ``subject_id`` are dropped.
    """
    uid_of = {r["study_key"]: r["study_uid"] for r in keymap}
    by_uid = {r[uid_column]: r for r in clinical}
    out = []
    for row in measurements:
        clin = by_uid.get(uid_of.get(row["study_key"], ""))
        if clin is None:
            continue
        extra = {k: v for k, v in clin.items() if k not in (uid_column, "subject_id")}
        out.append({**row, **extra})
    return out


def group_summary(rows: list[dict], columns: list[str], group: str = "group") -> list[dict]:
    """Per column: n, mean and SD per group and Welch's t-test between the first two groups."""
    groups = defaultdict(list)
    for r in rows:
        groups[r[group]].append(r)
    names = sorted(groups, key=lambda g: (g != "normal", g))  # reference group first
    out = []
    for col in columns:
        entry = {"measure": col}
        samples = []
        for g in names:
            v = np.array([r[col] for r in groups[g] if r[col] is not None and not math.isnan(r[col])], float)
            samples.append(v)
            entry[f"{g}_n"] = int(v.size)
            entry[f"{g}_mean"] = float(v.mean()) if v.size else math.nan
            entry[f"{g}_sd"] = float(v.std(ddof=1)) if v.size > 1 else math.nan
        if len(samples) >= 2 and min(s.size for s in samples[:2]) > 1:
            entry["welch_p"] = float(sps.ttest_ind(samples[0], samples[1], equal_var=False).pvalue)
        else:
            entry["welch_p"] = math.nan
        out.append(entry)
    return out
