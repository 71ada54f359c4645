"""Cohort statistics: measurements joined with pseudonymous clinical data, compared between
groups, along an ordinal grade, and over time.

Every test is two-sided. p-values come from scipy (Welch's t, Mann-Whitney U, Spearman) and
statsmodels (OLS, mixed models, Holm / Benjamini-Hochberg); the effect sizes are computed
here from their textbook definitions (references at each function).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

from kneebatch import labels as L

DAYS_PER_YEAR = 365.25
Z95 = float(sps.norm.ppf(0.975))


# ---------------------------------------------------------------- the table
# of the OA cartilage subregions, the weight-bearing ones the OAI's endpoints are built on; the
# other regions stay in the table for analyses that ask for them (--measures)
DEFAULT_REGIONS = ("cMF", "cLF", "cMT", "cLT")


def default_measures(df: pd.DataFrame) -> list[str]:
    """Volumes in mL and mean cartilage thicknesses (per plate, and of the central subregions)
    that vary in the cohort (an all-zero tissue, e.g. one the engines never segment, tests nothing)."""
    def wanted(c: str) -> bool:
        region = c.split("_", 1)[0]
        if region in L.CARTILAGE_REGIONS:
            return region in DEFAULT_REGIONS and c.endswith("_thickness_mean_mm")
        return c.endswith("_volume_ml") or c.endswith("_thickness_mean_mm")

    cols = [c for c in df.columns if wanted(c)]
    return [c for c in cols if pd.to_numeric(df[c], errors="coerce").nunique(dropna=True) > 1]


def not_segmented(df: pd.DataFrame) -> list[str]:
    """Tissues no row measured (their volume null in every row): what the model that made the
    labels does not segment (another tool's, ``run --model``), never to be read as absent."""
    return [label.name for label in L.LABELS
            if f"{label.name}_volume_mm3" in df and len(df) and df[f"{label.name}_volume_mm3"].isna().all()]


def join(measurements: pd.DataFrame, clinical: pd.DataFrame | None) -> pd.DataFrame:
    """Measurement rows with their clinical columns: by ``study_key`` where the clinical table
    has one per study, else by ``subject_key`` (a table of subjects: every visit gets its row)."""
    if clinical is None:
        return measurements.copy()
    clinical = clinical.drop(columns=[c for c in ("in_store",) if c in clinical])
    if "study_key" in clinical and clinical["study_key"].notna().any():
        on = "study_key"
        extra = clinical.drop(columns=[c for c in ("subject_key",) if c in clinical and c in measurements])
    elif "subject_key" in clinical:
        on = "subject_key"
        extra = clinical.drop(columns=[c for c in ("study_key",) if c in clinical])
    else:
        raise ValueError("the clinical table has neither study_key nor subject_key: make it with kneebatch clinical")
    extra = extra.dropna(subset=[on]).drop_duplicates(subset=[on], keep="last")
    clash = [c for c in extra.columns if c != on and c in measurements.columns]
    return measurements.merge(extra.drop(columns=clash), on=on, how="inner")


def first_visits(df: pd.DataFrame) -> pd.DataFrame:
    """Each subject's first study (visits of one knee are not independent samples); studies
    without a subject key are kept as they are."""
    if "subject_key" not in df or "visit_days" not in df or not df["subject_key"].notna().any():
        return df
    known = df[df["subject_key"].notna()].sort_values(["subject_key", "visit_days"], na_position="last")
    return pd.concat([known.drop_duplicates("subject_key", keep="first"), df[df["subject_key"].isna()]])


# ---------------------------------------------------------------- effect sizes
def cohens_d(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Cohen's d of b - a with the pooled SD, and its 95 % CI from the large-sample variance
    (Hedges & Olkin 1985, eq. 5.14): var(d) = (n1+n2)/(n1 n2) + d^2 / (2 (n1+n2))."""
    n1, n2 = a.size, b.size
    if n1 < 2 or n2 < 2:
        return math.nan, math.nan, math.nan
    pooled = math.sqrt(((n1 - 1) * a.var(ddof=1) + (n2 - 1) * b.var(ddof=1)) / (n1 + n2 - 2))
    if pooled == 0:
        return math.nan, math.nan, math.nan
    d = (b.mean() - a.mean()) / pooled
    se = math.sqrt((n1 + n2) / (n1 * n2) + d * d / (2 * (n1 + n2)))
    return d, d - Z95 * se, d + Z95 * se


def cliffs_delta(a: np.ndarray, b: np.ndarray) -> float:
    """P(b > a) - P(b < a) over all pairs (Cliff 1993); from the Mann-Whitney U of b."""
    if not a.size or not b.size:
        return math.nan
    u_b = sps.mannwhitneyu(b, a, alternative="two-sided").statistic
    return float(2 * u_b / (a.size * b.size) - 1)


def hodges_lehmann(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """The Hodges-Lehmann shift b - a (median of all pairwise differences) and its
    distribution-free 95 % CI: the order statistics C and mn + 1 - C of the differences with
    C from the normal approximation of U (Hollander & Wolfe, Nonparametric Statistical
    Methods, 3rd ed., 4.3)."""
    m, n = a.size, b.size
    if not m or not n:
        return math.nan, math.nan, math.nan
    diffs = np.sort((b[:, None] - a[None, :]).ravel())
    shift = float(np.median(diffs))
    c = _mann_whitney_lower(m, n) + 1
    if c < 1:  # too few pairs for a 95 % interval
        return shift, math.nan, math.nan
    return shift, float(diffs[c - 1]), float(diffs[m * n - c])


def _mann_whitney_lower(m: int, n: int, alpha: float = 0.05) -> int:
    """The largest u with P(U <= u) <= alpha/2 under the null (-1 if none): exact from U's
    generating function, the Gaussian binomial [m+n, m]_q, up to 10,000 pairs; else the
    normal approximation."""
    if m * n > 10_000:
        return int(round(m * n / 2 - Z95 * math.sqrt(m * n * (m + n + 1) / 12) - 0.5))
    counts = np.zeros(m * n + 1, dtype=object)  # Python ints: exact however many arrangements
    counts[0] = 1
    for i in range(1, m + 1):  # times (1 - q^(n+i)) / (1 - q^i)
        shifted = np.zeros_like(counts)
        shifted[n + i:] = counts[:m * n + 1 - n - i]
        counts = counts - shifted
        for k in range(i, m * n + 1):  # division by (1 - q^i): a running sum with stride i
            counts[k] += counts[k - i]
    cdf = np.cumsum(counts) / math.comb(m + n, m)
    below = np.nonzero(cdf.astype(float) <= alpha / 2)[0]
    return int(below[-1]) if below.size else -1


def adjust_p(p: list[float], method: str) -> list[float]:
    """Holm ("holm") or Benjamini-Hochberg ("fdr_bh") across measurements; NaNs stay NaN."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p, float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method=method)[1]
    return out.tolist()


def values(df: pd.DataFrame, column: str) -> np.ndarray:
    v = pd.to_numeric(df[column], errors="coerce").to_numpy(float)
    return v[~np.isnan(v)]


# ---------------------------------------------------------------- tables
def cohort_table(df: pd.DataFrame, by: str) -> pd.DataFrame:
    """Per group: studies, subjects, sex split, age mean and SD."""
    rows = []
    for name, g in groups(df, by):
        row = {by: name, "studies": len(g)}
        if "subject_key" in g and g["subject_key"].notna().any():
            row["subjects"] = int(g["subject_key"].nunique())
        if "sex" in g:
            sex = g["sex"].astype(str).str.upper().str[:1]
            row["female"], row["male"] = int((sex == "F").sum()), int((sex == "M").sum())
        if "age" in g:
            age = values(g, "age")
            row["age_mean"] = float(age.mean()) if age.size else math.nan
            row["age_sd"] = float(age.std(ddof=1)) if age.size > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def groups(df: pd.DataFrame, by: str, reference=None) -> list[tuple[object, pd.DataFrame]]:
    if by not in df:
        raise ValueError(f"no column {by!r} to group by; the table has: {', '.join(map(str, df.columns))}")
    names = sorted(df[by].dropna().unique(), key=lambda g: (str(g) != str(reference), str(g) != "normal", str(g)))
    return [(name, df[df[by] == name]) for name in names]


def describe(v: np.ndarray) -> dict:
    if not v.size:
        return {"n": 0, "mean": math.nan, "sd": math.nan, "median": math.nan, "q1": math.nan, "q3": math.nan}
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {"n": int(v.size), "mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else math.nan,
            "median": float(med), "q1": float(q1), "q3": float(q3)}


def compare_groups(df: pd.DataFrame, by: str, measures: list[str], reference=None,
                   adjust: list[str] | None = None) -> pd.DataFrame:
    """Each group against the reference group (``reference``, else ``normal``, else the first in
    sort order), per measurement: descriptives, Welch's t and Mann-Whitney U p-values, Cohen's
    d, Cliff's delta and the Hodges-Lehmann shift with 95 % CIs, Holm and BH-adjusted p over the
    measurements; with ``adjust`` (e.g. ``age, sex``), the group's coefficient in an OLS model
    ``measure ~ group + covariates`` with its CI and p."""
    found = groups(df, by, reference)
    if len(found) < 2:
        raise ValueError(f"{by!r} has {len(found)} group(s) in the joined table; a comparison needs two")
    (ref_name, ref), others = found[0], found[1:]
    rows = []
    for name, g in others:
        for col in measures:
            a, b = values(ref, col), values(g, col)
            row = {"measure": col, "group": str(name), "reference": str(ref_name)}
            row.update({f"reference_{k}": v for k, v in describe(a).items()})
            row.update({f"group_{k}": v for k, v in describe(b).items()})
            two = a.size > 1 and b.size > 1
            row["welch_t"], row["welch_p"] = (map(float, sps.ttest_ind(b, a, equal_var=False))
                                              if two and (a.std() > 0 or b.std() > 0) else (math.nan, math.nan))
            row["mannwhitney_u"], row["mannwhitney_p"] = (map(float, sps.mannwhitneyu(b, a, alternative="two-sided"))
                                                          if a.size and b.size else (math.nan, math.nan))
            row["cohens_d"], row["cohens_d_ci_low"], row["cohens_d_ci_high"] = cohens_d(a, b)
            row["cliffs_delta"] = cliffs_delta(a, b)
            row["hl_shift"], row["hl_ci_low"], row["hl_ci_high"] = hodges_lehmann(a, b)
            if adjust:
                row.update(_adjusted(df[df[by].isin([ref_name, name])], col, by, ref_name, name, adjust))
            rows.append(row)
    out = pd.DataFrame(rows)
    for test in ("welch", "mannwhitney"):
        out[f"{test}_p_holm"] = np.nan
        out[f"{test}_p_fdr"] = np.nan
        for _, idx in out.groupby("group").groups.items():
            out.loc[idx, f"{test}_p_holm"] = adjust_p(out.loc[idx, f"{test}_p"].tolist(), "holm")
            out.loc[idx, f"{test}_p_fdr"] = adjust_p(out.loc[idx, f"{test}_p"].tolist(), "fdr_bh")
    return out


def _formula_term(column: str, categorical: bool) -> str:
    quoted = f'Q("{column}")'
    return f"C({quoted})" if categorical else quoted


def _adjusted(df: pd.DataFrame, measure: str, by: str, ref_name, name, covariates: list[str]) -> dict:
    """OLS ``measure ~ group + covariates``: the group's coefficient, 95 % CI and p."""
    import statsmodels.formula.api as smf

    data = df[[measure, by, *covariates]].copy()
    data[measure] = pd.to_numeric(data[measure], errors="coerce")
    data["_group"] = (data[by] == name).astype(float)
    terms = []
    for c in covariates:
        numeric = pd.api.types.is_numeric_dtype(data[c])
        terms.append(_formula_term(c, not numeric))
    data = data.dropna()
    nan = {"adjusted_coef": math.nan, "adjusted_ci_low": math.nan, "adjusted_ci_high": math.nan,
           "adjusted_p": math.nan, "adjusted_for": "+".join(covariates)}
    if len(data) < len(terms) + 3 or data["_group"].nunique() < 2:
        return nan
    fit = smf.ols(f'Q("{measure}") ~ _group' + "".join(" + " + t for t in terms), data=data).fit()
    low, high = fit.conf_int().loc["_group"]
    return {**nan, "adjusted_coef": float(fit.params["_group"]), "adjusted_ci_low": float(low),
            "adjusted_ci_high": float(high), "adjusted_p": float(fit.pvalues["_group"])}


def trend(df: pd.DataFrame, grade: str, measures: list[str]) -> pd.DataFrame:
    """A measurement along an ordinal grade (e.g. KL 0-4): Spearman's rho and p, and the OLS
    slope per grade step with its 95 % CI and p."""
    import statsmodels.api as sm

    if grade not in df:
        raise ValueError(f"no column {grade!r} for --trend")
    rows = []
    for col in measures:
        data = pd.DataFrame({"x": pd.to_numeric(df[grade], errors="coerce"),
                             "y": pd.to_numeric(df[col], errors="coerce")}).dropna()
        row = {"measure": col, "grade": grade, "n": len(data), "levels": int(data["x"].nunique())}
        if len(data) < 3 or data["x"].nunique() < 2 or data["y"].nunique() < 2:
            rows.append({**row, "spearman_rho": math.nan, "spearman_p": math.nan, "slope_per_grade": math.nan,
                         "slope_ci_low": math.nan, "slope_ci_high": math.nan, "slope_p": math.nan})
            continue
        rho, p = sps.spearmanr(data["x"], data["y"])
        fit = sm.OLS(data["y"].to_numpy(), sm.add_constant(data["x"].to_numpy())).fit()
        low, high = fit.conf_int()[1]
        rows.append({**row, "spearman_rho": float(rho), "spearman_p": float(p), "slope_per_grade": float(fit.params[1]),
                     "slope_ci_low": float(low), "slope_ci_high": float(high), "slope_p": float(fit.pvalues[1])})
    out = pd.DataFrame(rows)
    out["spearman_p_holm"] = adjust_p(out["spearman_p"].tolist(), "holm")
    return out


# ---------------------------------------------------------------- change over time
@dataclass
class Slopes:
    per_subject: pd.DataFrame  # subject_key, group, measure, visits, years, slope (/yr), baseline, percent_per_year
    comparison: pd.DataFrame  # per measure: the groups' rates and their difference


def subject_slopes(df: pd.DataFrame, by: str, measures: list[str]) -> pd.DataFrame:
    """Per subject with two or more dated visits and per measurement: the least-squares change
    per year, the fitted value at the first visit, and the change as % of it a year."""
    need = {"subject_key", "visit_days"} - set(df.columns)
    if need:
        raise ValueError(f"the measurements have no {', '.join(sorted(need))}: convert the source again "
                         "(stores made before visits were recorded) or check the DICOM has PatientID and StudyDate")
    data = df.dropna(subset=["subject_key", "visit_days"])
    rows = []
    for subject, g in data.groupby("subject_key"):
        years = g["visit_days"].to_numpy(float) / DAYS_PER_YEAR
        if np.unique(years).size < 2:
            continue
        group = g[by].iloc[0] if by in g else None
        for col in measures:
            y = pd.to_numeric(g[col], errors="coerce").to_numpy(float)
            ok = ~np.isnan(y)
            if np.unique(years[ok]).size < 2:
                continue
            fit = sps.linregress(years[ok], y[ok])
            base = fit.intercept + fit.slope * years[ok].min()
            rows.append({"subject_key": subject, by: group, "measure": col, "visits": int(ok.sum()),
                         "years": float(np.ptp(years[ok])), "slope_per_year": float(fit.slope), "baseline": float(base),
                         "percent_per_year": float(100 * fit.slope / base) if base else math.nan})
    return pd.DataFrame(rows)


def compare_slopes(slopes: pd.DataFrame, by: str, reference=None) -> pd.DataFrame:
    """Per measurement, the groups' change per year (absolute and %) and each group against the
    reference by Welch's t and Mann-Whitney U on the per-subject slopes."""
    rows = []
    for col, s in slopes.groupby("measure", sort=False):
        found = groups(s, by, reference)
        if len(found) < 2:
            continue
        (ref_name, ref), others = found[0], found[1:]
        for name, g in others:
            a, b = ref["slope_per_year"].to_numpy(float), g["slope_per_year"].to_numpy(float)
            row = {"measure": col, "group": str(name), "reference": str(ref_name),
                   "reference_subjects": int(a.size), "group_subjects": int(b.size),
                   "reference_slope_mean": float(a.mean()), "group_slope_mean": float(b.mean()),
                   "reference_percent_per_year": float(ref["percent_per_year"].mean()),
                   "group_percent_per_year": float(g["percent_per_year"].mean())}
            two = a.size > 1 and b.size > 1 and (a.std() > 0 or b.std() > 0)
            row["welch_p"] = float(sps.ttest_ind(b, a, equal_var=False).pvalue) if two else math.nan
            row["mannwhitney_p"] = float(sps.mannwhitneyu(b, a, alternative="two-sided").pvalue) if two else math.nan
            row["hl_shift"], row["hl_ci_low"], row["hl_ci_high"] = hodges_lehmann(a, b)
            rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        out["welch_p_holm"] = adjust_p(out["welch_p"].tolist(), "holm")
    return out


def mixed_model(df: pd.DataFrame, by: str, measure: str, reference=None) -> dict:
    """A linear mixed model ``measure ~ years * group`` with a random intercept per subject
    (statsmodels MixedLM, REML): the reference group's change per year and the other group's
    difference in it, with 95 % CIs and p."""
    import statsmodels.formula.api as smf

    found = groups(df, by, reference)
    if len(found) != 2:
        raise ValueError("the mixed model compares two groups")
    ref_name, name = found[0][0], found[1][0]
    data = pd.DataFrame({"y": pd.to_numeric(df[measure], errors="coerce"), "years": df["visit_days"] / DAYS_PER_YEAR,
                         "g": (df[by] == name).astype(float), "subject": df["subject_key"]}).dropna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on small synthetic cohorts
        fit = smf.mixedlm("y ~ years * g", data, groups=data["subject"]).fit(reml=True)
    ci = fit.conf_int()
    return {"measure": measure, "reference": str(ref_name), "group": str(name),
            "reference_slope": float(fit.params["years"]), "reference_slope_ci_low": float(ci.loc["years", 0]),
            "reference_slope_ci_high": float(ci.loc["years", 1]), "reference_slope_p": float(fit.pvalues["years"]),
            "slope_difference": float(fit.params["years:g"]), "slope_difference_ci_low": float(ci.loc["years:g", 0]),
            "slope_difference_ci_high": float(ci.loc["years:g", 1]), "slope_difference_p": float(fit.pvalues["years:g"])}


def longitudinal(df: pd.DataFrame, by: str, measures: list[str], reference=None) -> tuple[Slopes, pd.DataFrame]:
    slopes = subject_slopes(df, by, measures)
    if slopes.empty:
        raise ValueError("no subject has two or more dated visits: nothing changes over time here")
    comparison = compare_slopes(slopes, by, reference)
    mixed = []
    if df[by].nunique() == 2:
        for col in measures:
            try:
                mixed.append(mixed_model(df, by, col, reference))
            except Exception as e:  # a singular fit on one measure leaves the others
                mixed.append({"measure": col, "error": f"{type(e).__name__}: {e}"})
    return Slopes(slopes, comparison), pd.DataFrame(mixed)


# ---------------------------------------------------------------- writing
def write_table(df: pd.DataFrame, folder: Path, name: str, title: str) -> list[Path]:
    """``name``.parquet, .csv and .md (the Markdown rounds to 4 significant digits)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.parquet", folder / f"{name}.csv", folder / f"{name}.md"]
    df.to_parquet(paths[0], index=False)
    df.to_csv(paths[1], index=False)
    paths[2].write_text(f"# {title}\n\n" + markdown(df) + "\n")
    return paths


def _cell(v) -> str:
    if isinstance(v, float | np.floating):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v).replace("|", "\\|")


def markdown(df: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)
