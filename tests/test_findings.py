"""From tables to findings: subject keys and visits, the pseudonymous clinical join, cohort
and longitudinal statistics (checked against scipy / statsmodels), figures."""

from __future__ import annotations

import csv
import math

import numpy as np
import pandas as pd
import pydicom
import pytest
from scipy import stats as sps

from kneebatch import stats
from kneebatch.synth.cohort import OA_CARTILAGE_CHANGE_PER_YEAR, PRESETS, generate_cohort

VISITS = (0, 12, 24, 48)  # the OAI's schedule, months
N_SUBJECTS = 10  # alternating normal / OA


# ---------------------------------------------------------------- a longitudinal cohort
@pytest.fixture(scope="module")
def longitudinal(tmp_path_factory):
    """10 subjects x 4 visits: DICOM -> store -> measurements of the truth label maps."""
    from kneebatch.jobs.convert import convert
    from kneebatch.jobs.measure import measure_store

    root = tmp_path_factory.mktemp("longitudinal")
    generate_cohort(root / "cohort", N_SUBJECTS, seed=4242, ranges=PRESETS["small"], workers=2, visits=VISITS)
    key_file = root / "study.key"
    convert(root / "cohort" / "dicom", root / "store", key_file=key_file, show_progress=False)
    measure_store(root / "store", root / "meas", labels_dir=root / "cohort" / "truth", show_progress=False)
    return root


def _independent_clinical_csv(root, path):
    """A clinical table as a hospital export would give it: columns named as in DICOM with
    spaces, a BOM, identifiers read from the files with pydicom (not from kneebatch)."""
    rows = {}
    for f in sorted((root / "cohort" / "dicom").rglob("*")):
        if not f.is_file():
            continue
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        rows[ds.StudyInstanceUID] = {"Patient ID": ds.PatientID, "Study Instance UID": ds.StudyInstanceUID,
                                     "Patient Name": str(ds.PatientName), "Birth Date": ds.PatientBirthDate,
                                     "Study Date": ds.StudyDate}
    truth = {r["study_uid"]: r for r in csv.DictReader(open(root / "cohort" / "clinical.csv"))}
    with open(path, "w", newline="", encoding="utf-8-sig") as f:
        w = csv.DictWriter(f, fieldnames=[*next(iter(rows.values())), "group", "KL", "age", "sex"])
        w.writeheader()
        for uid, r in rows.items():
            t = truth[uid]
            w.writerow({**r, "group": t["group"], "KL": t["kl_grade"], "age": t["age"], "sex": t["sex"]})
    return rows


def test_subject_keys_and_visit_days_travel_from_convert_to_the_rows(longitudinal):
    from kneebatch.outputs import read_rows

    meas = pd.read_parquet(longitudinal / "meas" / "measurements.parquet")
    assert len(meas) == N_SUBJECTS * len(VISITS)
    assert meas["subject_key"].nunique() == N_SUBJECTS
    assert meas["subject_key"].str.fullmatch(r"s[0-9a-f]{20}").all()
    for _, g in meas.groupby("subject_key"):
        # 12, 24, 48 months after baseline: 365, 730, 1461 days (the generator's calendar)
        assert sorted(g["visit_days"]) == [0, 365, 730, 1461]
    keymap = read_rows(longitudinal / "store" / "keymap.parquet")
    assert all(r["patient_id"] and len(r["study_date"]) == 8 for r in keymap)
    # identifiers stay in the keymap: no patient ID or date in the measurements
    ids = {r["patient_id"] for r in keymap} | {r["study_date"] for r in keymap}
    text = meas.astype(str).to_numpy().ravel()
    assert not ids & set(text)


def test_clinical_replaces_identifiers_with_the_stores_keys(longitudinal, tmp_path, capsys):
    from kneebatch.cli import main

    source = tmp_path / "export.csv"
    rows = _independent_clinical_csv(longitudinal, source)
    out = tmp_path / "clinical.parquet"
    assert main(["clinical", str(longitudinal / "store"), str(source), str(out),
                 "--key-file", str(longitudinal / "study.key")]) == 0
    said = capsys.readouterr().out
    assert "Study Instance UID -> study_key" in said and "Patient ID -> subject_key" in said
    table = pd.read_parquet(out)
    assert list(table.columns) == ["study_key", "in_store", "subject_key", "group", "KL", "age", "sex"]
    assert len(table) == N_SUBJECTS * len(VISITS) and table["in_store"].all()
    meas = pd.read_parquet(longitudinal / "meas" / "measurements.parquet")
    assert set(table["study_key"]) == set(meas["study_key"])
    joined = meas.merge(table, on="study_key", suffixes=("", "_clin"))
    assert (joined["subject_key"] == joined["subject_key_clin"]).all()
    # no identifier of the export is anywhere in the file
    raw = out.read_bytes()
    for r in rows.values():
        for value in r.values():
            assert value.encode() not in raw, value
    # another secret would match nothing: refused
    other = tmp_path / "other.key"
    other.write_text("0" * 64 + "\n")
    assert main(["clinical", str(longitudinal / "store"), str(source), str(tmp_path / "x.parquet"),
                 "--key-file", str(other)]) != 0
    assert "not the one" in capsys.readouterr().err and not (tmp_path / "x.parquet").exists()
    # a file kneebatch did not write is never overwritten
    mine = tmp_path / "mine.parquet"
    mine.write_bytes(b"my own data")
    assert main(["clinical", str(longitudinal / "store"), str(source), str(mine),
                 "--key-file", str(longitudinal / "study.key")]) != 0
    assert "not written by kneebatch" in capsys.readouterr().err
    assert mine.read_bytes() == b"my own data"


def _clinical(longitudinal, tmp_path):
    from kneebatch.clinical import pseudonymise_clinical

    out = tmp_path / "clinical.parquet"
    pseudonymise_clinical(longitudinal / "store", longitudinal / "cohort" / "clinical.csv", out,
                          key_file=longitudinal / "study.key")
    return out


def test_stats_reproduces_the_papers_result_on_first_visits(longitudinal, tmp_path):
    """Yu et al. 2024: effusion higher in OA (P < 0.05); muscle not different."""
    from kneebatch.findings import StatsSettings, run_stats

    result = run_stats(longitudinal / "meas", _clinical(longitudinal, tmp_path), tmp_path / "stats",
                       StatsSettings(trend="kl_grade"))
    assert result["studies_compared"] == N_SUBJECTS  # one study per subject
    c = result["comparison"].set_index("measure")
    assert c.loc["effusion_volume_ml", "mannwhitney_p"] < 0.05
    assert c.loc["effusion_volume_ml", "hl_shift"] > 0 and c.loc["effusion_volume_ml", "cliffs_delta"] == 1.0
    assert c.loc["total_muscle_volume_ml", "mannwhitney_p"] > 0.05
    cohort = pd.read_parquet(tmp_path / "stats" / "cohort.parquet").set_index("group")
    assert cohort.loc["normal", "studies"] == cohort.loc["OA", "studies"] == N_SUBJECTS // 2
    trend = pd.read_parquet(tmp_path / "stats" / "trend.parquet").set_index("measure")
    assert trend.loc["effusion_volume_ml", "spearman_rho"] > 0.6 and trend.loc["effusion_volume_ml", "spearman_p"] < 0.05
    for name in ("by_group.png", "by_group.svg", "by_kl_grade.png", "comparison.md", "comparison.csv"):
        assert (tmp_path / "stats" / name).stat().st_size > 1000


def test_longitudinal_rates_recovered(longitudinal, tmp_path):
    """OA knees lose 5 % of their cartilage a year and gain effusion; normal knees keep both."""
    from kneebatch.findings import StatsSettings, run_stats

    measures = ["total_cartilage_volume_ml", "femoral_cartilage_volume_ml", "effusion_volume_ml",
                "total_muscle_volume_ml"]
    run_stats(longitudinal / "meas", _clinical(longitudinal, tmp_path), tmp_path / "stats",
              StatsSettings(measures=measures, longitudinal=True))
    per = pd.read_parquet(tmp_path / "stats" / "change_by_group.parquet").set_index("measure")
    rate = 100 * OA_CARTILAGE_CHANGE_PER_YEAR
    # cartilage volume is area x thickness: it falls at the thickness' rate (tolerance 1 %/yr)
    for m in ("total_cartilage_volume_ml", "femoral_cartilage_volume_ml"):
        assert abs(per.loc[m, "group_percent_per_year"] - rate) < 1.0, per.loc[m]
        assert abs(per.loc[m, "reference_percent_per_year"]) < 1.0, per.loc[m]
        assert per.loc[m, "welch_p"] < 0.01
    # effusion's scale grows 20 %/yr; the recesses fill unevenly, so its volume 12-24 %/yr
    assert 12 < per.loc["effusion_volume_ml", "group_percent_per_year"] < 24
    assert abs(per.loc["effusion_volume_ml", "reference_percent_per_year"]) < 3
    # muscle does not change in either group beyond repositioning noise (the FOV cuts the thigh)
    assert abs(per.loc["total_muscle_volume_ml", "group_percent_per_year"]) < 2
    assert abs(per.loc["total_muscle_volume_ml", "reference_percent_per_year"]) < 2
    mixed = pd.read_parquet(tmp_path / "stats" / "change_mixed_model.parquet").set_index("measure")
    row = mixed.loc["total_cartilage_volume_ml"]
    assert row["slope_difference_ci_high"] < 0 < row["reference_slope_ci_high"]
    subjects = pd.read_parquet(tmp_path / "stats" / "change_per_subject.parquet")
    assert set(subjects["visits"]) == {len(VISITS)} and subjects["subject_key"].nunique() == N_SUBJECTS
    assert (tmp_path / "stats" / "trajectories.svg").exists()


# ---------------------------------------------------------------- the numbers themselves
@pytest.fixture
def table():
    rng = np.random.default_rng(7)
    n = 40
    df = pd.DataFrame({"study_key": [f"k{i:020x}" for i in range(n)],
                       "group": np.where(np.arange(n) % 2, "OA", "normal"),
                       "kl_grade": rng.integers(0, 5, n), "age": rng.normal(60, 8, n).round(),
                       "sex": rng.choice(["F", "M"], n)})
    oa = (df["group"] == "OA").to_numpy()
    df["effusion_volume_ml"] = rng.lognormal(1.5, 0.5, n) + 4 * oa
    df["total_muscle_volume_ml"] = rng.normal(150, 20, n) - 0.8 * df["age"]
    df["femoral_cartilage_thickness_mean_mm"] = 2.2 - 0.15 * df["kl_grade"] + rng.normal(0, 0.1, n)
    df.loc[3, "effusion_volume_ml"] = np.nan  # a missing value is left out, not counted
    return df


MEASURES = ["effusion_volume_ml", "total_muscle_volume_ml", "femoral_cartilage_thickness_mean_mm"]


def test_group_comparison_matches_scipy_and_statsmodels(table):
    import statsmodels.api as sm
    from statsmodels.stats.multitest import multipletests

    out = stats.compare_groups(table, "group", MEASURES, adjust=["age", "sex"]).set_index("measure")
    ref, oa = table[table.group == "normal"], table[table.group == "OA"]
    for m in MEASURES:
        a, b = ref[m].dropna().to_numpy(), oa[m].dropna().to_numpy()
        row = out.loc[m]
        assert row["reference_n"] == a.size and row["group_n"] == b.size
        assert row["group_median"] == pytest.approx(np.median(b), abs=1e-12)
        assert row["welch_p"] == pytest.approx(sps.ttest_ind(b, a, equal_var=False).pvalue, rel=1e-9, abs=1e-15)
        assert row["mannwhitney_p"] == pytest.approx(sps.mannwhitneyu(b, a).pvalue, rel=1e-9, abs=1e-15)
        # effect sizes from their definitions, brute force
        diffs = (b[:, None] - a[None, :]).ravel()
        assert row["hl_shift"] == pytest.approx(np.median(diffs), abs=1e-12)
        assert row["cliffs_delta"] == pytest.approx(((diffs > 0).sum() - (diffs < 0).sum()) / diffs.size, abs=1e-12)
        sp = math.sqrt(((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (a.size + b.size - 2))
        d = (b.mean() - a.mean()) / sp
        assert row["cohens_d"] == pytest.approx(d, abs=1e-12)
        se = math.sqrt((a.size + b.size) / (a.size * b.size) + d * d / (2 * (a.size + b.size)))
        assert row["cohens_d_ci_low"] == pytest.approx(d - 1.959963984540054 * se, abs=1e-9)
        # the HL interval brackets the shift and holds ~95 % of pairwise differences' middle
        assert row["hl_ci_low"] < row["hl_shift"] < row["hl_ci_high"]
        # OLS adjusted for age and sex, with the design matrix built here
        data = table[[m, "group", "age", "sex"]].dropna()
        x = np.column_stack([np.ones(len(data)), (data.group == "OA").astype(float), data.age, (data.sex == "M")])
        fit = sm.OLS(data[m].to_numpy(), x).fit()
        assert row["adjusted_coef"] == pytest.approx(fit.params[1], rel=1e-9)
        assert row["adjusted_p"] == pytest.approx(fit.pvalues[1], rel=1e-9)
        assert row["adjusted_ci_low"] == pytest.approx(fit.conf_int()[1][0], rel=1e-9)
    holm = multipletests(out["mannwhitney_p"].to_numpy(), method="holm")[1]
    np.testing.assert_allclose(out["mannwhitney_p_holm"].to_numpy(), holm, rtol=1e-12)
    bh = multipletests(out["welch_p"].to_numpy(), method="fdr_bh")[1]
    np.testing.assert_allclose(out["welch_p_fdr"].to_numpy(), bh, rtol=1e-12)
    assert out.loc["effusion_volume_ml", "mannwhitney_p"] < 1e-4  # the planted difference is found


def test_hodges_lehmann_interval_matches_the_exact_order_statistics():
    """For 8 vs 8, the table value of the two-sided 95 % Mann-Whitney critical value is 13
    (Hollander & Wolfe, Table A.6): the CI is the 14th smallest and largest difference."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 8), rng.normal(1, 1, 8)
    shift, low, high = stats.hodges_lehmann(a, b)
    d = np.sort((b[:, None] - a[None, :]).ravel())
    assert (low, high) == (d[13], d[64 - 14])
    assert shift == np.median(d)


def test_trend_and_cohort_table(table):
    import statsmodels.api as sm

    tr = stats.trend(table, "kl_grade", MEASURES).set_index("measure")
    m = "femoral_cartilage_thickness_mean_mm"
    rho, p = sps.spearmanr(table["kl_grade"], table[m])
    assert tr.loc[m, "spearman_rho"] == pytest.approx(rho, abs=1e-12)
    assert tr.loc[m, "spearman_p"] == pytest.approx(p, rel=1e-9)
    fit = sm.OLS(table[m].to_numpy(), sm.add_constant(table["kl_grade"].to_numpy(float))).fit()
    assert tr.loc[m, "slope_per_grade"] == pytest.approx(fit.params[1], rel=1e-9)
    assert tr.loc[m, "slope_p"] == pytest.approx(fit.pvalues[1], rel=1e-9)
    assert tr.loc[m, "slope_per_grade"] == pytest.approx(-0.15, abs=0.03)
    cohort = stats.cohort_table(table, "group").set_index("group")
    oa = table[table.group == "OA"]
    assert cohort.loc["OA", "studies"] == 20
    assert cohort.loc["OA", "female"] == (oa.sex == "F").sum()
    assert cohort.loc["OA", "age_sd"] == pytest.approx(oa.age.std(ddof=1), rel=1e-12)


def test_slopes_and_mixed_model_match_statsmodels():
    import statsmodels.formula.api as smf

    rng = np.random.default_rng(11)
    rows = []
    for s in range(12):
        group = "OA" if s % 2 else "normal"
        base, slope = rng.normal(10, 1), (-0.5 if group == "OA" else 0.0)
        for days in (0, 365, 730, 1461):
            rows.append({"subject_key": f"s{s:020x}", "visit_days": days, "group": group,
                         "x": base + slope * days / 365.25 + rng.normal(0, 0.05)})
    df = pd.DataFrame(rows)
    per = stats.subject_slopes(df, "group", ["x"])
    one = df[df.subject_key == df.subject_key.iloc[4]]
    fit = sps.linregress(one.visit_days / 365.25, one.x)
    assert per.set_index("subject_key").loc[one.subject_key.iloc[0], "slope_per_year"] == pytest.approx(fit.slope, rel=1e-12)
    cmp = stats.compare_slopes(per, "group").iloc[0]
    assert cmp["group_slope_mean"] == pytest.approx(-0.5, abs=0.05) and cmp["welch_p"] < 1e-6
    mixed = stats.mixed_model(df, "group", "x")
    data = pd.DataFrame({"y": df.x, "years": df.visit_days / 365.25, "g": (df.group == "OA").astype(float)})
    ref = smf.mixedlm("y ~ years * g", data, groups=df.subject_key).fit(reml=True)
    assert mixed["slope_difference"] == pytest.approx(ref.params["years:g"], rel=1e-9)
    assert mixed["slope_difference_p"] == pytest.approx(ref.pvalues["years:g"], rel=1e-6)


def test_stats_cli_refuses_what_it_cannot_do(longitudinal, tmp_path, capsys):
    from kneebatch.cli import main

    clin = _clinical(longitudinal, tmp_path)
    assert main(["stats", str(longitudinal / "meas"), "--clinical", str(clin), "--by", "no_such"]) != 0
    assert "no column 'no_such'" in capsys.readouterr().err
    assert main(["stats", str(tmp_path), "--clinical", str(clin)]) != 0
    assert "measurements.parquet" in capsys.readouterr().err
