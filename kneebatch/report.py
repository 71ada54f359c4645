"""``kneebatch report``: one self-contained HTML file for a job's outputs.

Everything is inline (no CDN, no network, opens from a file or an e-mail attachment):
the cohort and comparison tables, the figures as SVG, QC flags, outliers and failures,
and a section per study with its slices and, for some, an interactive 3-D view (three.js
bundled in ``kneebatch/assets``, the study's GLB inlined as base64). Only keys, never
identifiers, appear.
"""

from __future__ import annotations

import base64
import html
import io
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from kneebatch import __version__, plots, stats
from kneebatch import labels as L
from kneebatch.findings import KEY_MEASURES
from kneebatch.outputs import store_of, write_text_atomic

ASSETS = Path(__file__).parent / "assets"
ROBUST_Z = 3.5  # |0.6745 (x - median) / MAD| above this is an outlier (Iglewicz & Hoaglin 1993)


def robust_z(values: pd.Series) -> pd.Series:
    v = pd.to_numeric(values, errors="coerce")
    med = v.median()
    mad = (v - med).abs().median()
    if not mad or math.isnan(mad):
        return pd.Series(0.0, index=v.index)
    return 0.6745 * (v - med) / mad


def outliers(df: pd.DataFrame, measures: list[str]) -> pd.DataFrame:
    rows = []
    for col in measures:
        z = robust_z(df[col])
        for i in z.index[z.abs() > ROBUST_Z]:
            rows.append({"study_key": df.at[i, "study_key"], "measure": col, "value": float(df.at[i, col]),
                         "robust_z": float(z[i])})
    return pd.DataFrame(rows, columns=["study_key", "measure", "value", "robust_z"])


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _png_data_uri(fig, dpi: int = 80) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _table(df: pd.DataFrame, cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for row in df.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, float | np.floating):
                text = "" if math.isnan(v) else f"{v:.4g}"
            elif isinstance(v, list | np.ndarray):
                text = ", ".join(map(str, v))
            else:
                text = str(v)
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
            "</table></div>")


def _study_section(store, key: str, row: pd.Series, shown: list[str], glb: bytes | None,
                   outline: bool = False) -> str:
    measures = "".join(f"<tr><td>{html.escape(plots.nice_name(m))}</td><td>{row[m]:.3g}</td></tr>"
                       for m in shown if m in row and pd.notna(row[m]))
    flags = ", ".join(row["qc_flags"]) if "qc_flags" in row and len(row["qc_flags"]) else "none"
    image = ""
    if store is not None:
        try:
            engine_set = row.get("engine_set")
            what = f"engine set {engine_set}" if isinstance(engine_set, str) and engine_set else None
            figure = plots.study_slices(store, key, row.get("label_name"), what, outline)
            image = f'<img alt="slices of {key}" src="{_png_data_uri(figure)}">'
            maps = plots.study_thickness_maps(store, key, row.get("label_name"), what)
            image += f'<img alt="cartilage thickness maps of {key}" src="{_png_data_uri(maps)}">'
        except Exception as e:  # a study without its label map in the store still gets its numbers
            image = f"<p class=note>no slices: {html.escape(str(e))}</p>"
    button = ""
    if glb is not None:
        button = (f'<button class="view3d" data-study="{key}">3-D view</button>'
                  f'<script type="application/octet-stream" id="glb-{key}">{base64.b64encode(glb).decode()}</script>')
    visit = "" if pd.isna(row.get("visit_days")) else f", visit day {int(row['visit_days'])}"
    # who the study is, from the joined clinical table (group, KL grade), and what segmented it
    who = [f"{html.escape(str(c).replace('_', ' '))} {html.escape(str(row[c]))}"
           for c in ("group", "kl_grade", "sex", "age") if c in row and pd.notna(row[c])]
    if isinstance(row.get("engine_set"), str) and row.get("engine_set"):
        who.append(f"engine set {html.escape(row['engine_set'])}")
    visit += (" · " + ", ".join(who)) if who else ""
    return (f'<section class="study" id="study-{key}"><h3>{key}{visit}</h3>{button}'
            f"<p>QC flags: {html.escape(flags)}</p><div class=cols><table class=small>{measures}</table>{image}</div>"
            "</section>")


VIEWER_JS = r"""
(function () {
  const canvas = document.getElementById("viewer");
  const status = document.getElementById("viewer-status");
  window.addEventListener("error", (e) => { document.body.dataset.error = String(e.message); });
  const consoleError = console.error;
  console.error = function (...args) { document.body.dataset.error = args.join(" "); consoleError.apply(console, args); };
  let renderer;
  try {
    renderer = new THREE.WebGLRenderer({ canvas: canvas, antialias: true });
  } catch (e) {
    status.textContent = "3-D view needs WebGL, which this browser does not offer.";
    document.body.dataset.viewer = "no-webgl";
    return;
  }
  renderer.setPixelRatio(window.devicePixelRatio || 1);
  const scene = new THREE.Scene();
  scene.background = new THREE.Color(0xf7f7f7);
  scene.add(new THREE.HemisphereLight(0xffffff, 0x666666, 2.2));
  const sun = new THREE.DirectionalLight(0xffffff, 1.6);
  sun.position.set(1, -1, 2);
  scene.add(sun);
  const camera = new THREE.PerspectiveCamera(35, 1, 1, 5000);
  camera.up.set(0, 0, 1);  // patient LPS: superior is up
  const controls = new THREE.OrbitControls(camera, canvas);
  let current = null;
  function resize() {
    const w = canvas.clientWidth, h = canvas.clientHeight;
    renderer.setSize(w, h, false);
    camera.aspect = w / h;
    camera.updateProjectionMatrix();
  }
  function b64ToBuffer(text) {
    const bin = atob(text.trim());
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return bytes.buffer;
  }
  // one tick box per tissue, in its colour (the legend); what is hidden stays hidden across
  // studies, and report.html#hide=femur,tibia opens with those hidden
  const panel = document.getElementById("tissues");
  const hidden = new Set(decodeURIComponent(location.hash.replace(/^#hide=/, "")).split(",").filter((t) => t));
  function toggles(root) {
    panel.textContent = "";
    const meshes = [];
    root.traverse((o) => { if (o.isMesh && o.material && o.material.name) meshes.push(o); });
    function record() {
      document.body.dataset.shown = meshes.filter((m) => m.visible).map((m) => m.material.name).join(",");
    }
    meshes.forEach((m) => {
      const tissue = m.material.name;
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.dataset.tissue = tissue;
      box.checked = !hidden.has(tissue);
      m.visible = box.checked;
      box.addEventListener("change", () => {
        m.visible = box.checked;
        if (box.checked) hidden.delete(tissue); else hidden.add(tissue);
        record();
      });
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = "#" + m.material.color.getHexString(THREE.SRGBColorSpace);
      label.append(box, swatch, tissue.replace(/_/g, " "));
      panel.append(label);
    });
    record();
  }
  function show(key) {
    const data = document.getElementById("glb-" + key);
    if (!data) return;
    new THREE.GLTFLoader().parse(b64ToBuffer(data.textContent), "", (gltf) => {
      if (current) scene.remove(current);
      current = gltf.scene;
      scene.add(current);
      const box = new THREE.Box3().setFromObject(current);
      const centre = box.getCenter(new THREE.Vector3());
      const size = box.getSize(new THREE.Vector3()).length();
      controls.target.copy(centre);
      camera.position.copy(centre).add(new THREE.Vector3(-0.6 * size, -1.2 * size, 0.35 * size));
      camera.near = size / 100; camera.far = size * 10;
      camera.updateProjectionMatrix();
      controls.update();
      toggles(current);
      status.textContent = "study " + key + ": drag to turn, scroll to zoom; tick the tissues to show";
      renderer.render(scene, camera);
      document.body.dataset.viewer = "ready";
      document.body.dataset.study = key;
    }, (err) => { document.body.dataset.error = "GLB: " + err; });
  }
  document.querySelectorAll("button.view3d").forEach((b) => b.addEventListener("click", () => {
    show(b.dataset.study);
    canvas.scrollIntoView();
  }));
  resize();
  window.addEventListener("resize", resize);
  renderer.setAnimationLoop(() => { controls.update(); renderer.render(scene, camera); });
  const first = document.querySelector("button.view3d");
  if (first) show(first.dataset.study); else status.textContent = "no 3-D views in this report";
})();
"""

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:0 18px;
color:#222}h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:14px;font-family:monospace}table{border-collapse:collapse;margin:8px 0;font-size:12px}
td,th{border:1px solid #ddd;padding:3px 6px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
#viewer{width:100%;height:520px;display:block;border:1px solid #ccc;background:#f7f7f7}
#tissues{display:flex;flex-wrap:wrap;gap:4px 14px;margin:6px 0;font-size:12px}#tissues label{white-space:nowrap}
.swatch{display:inline-block;width:11px;height:11px;margin:0 4px 0 2px;border:1px solid #888;vertical-align:-1px}
.figure svg{max-width:100%;height:auto}
.cols{display:flex;gap:16px;align-items:flex-start;flex-wrap:wrap}.cols img{max-width:720px;width:100%}
.note{color:#666}.study{border-top:1px solid #eee;padding-top:6px}.small td{font-size:11px}
button.view3d{margin-bottom:6px}.scroll{overflow-x:auto;max-width:100%}
"""


def build_report(out, path=None, store=None, clinical=None, by: str | None = None, reference=None,
                 meshes: int = 6, study_pages: int = 200, trend: str | None = None, outline: bool = False) -> Path:
    """Write ``path`` (default ``OUT/report.html``) for the job in ``out``. ``meshes``: studies
    with a 3-D view (the outliers first, then in key order); ``study_pages``: studies with a
    section of their own (all QC-flagged and outlying studies always get one); ``trend``: an
    ordinal column of the clinical table (e.g. ``kl_grade``) to test each measurement along;
    ``outline``: the slices show each tissue's outline rather than a transparent fill."""
    from kneebatch.ingest.store import CohortStore
    from kneebatch.mesh import glb_bytes, tissue_meshes

    out = Path(out)
    path = Path(path) if path else out / "report.html"
    if path.exists() and b"kneebatch report" not in path.read_bytes()[:400]:
        raise ValueError(f"{path} exists and is not a kneebatch report; choose another file")
    df = pd.read_parquet(out / "measurements.parquet") if (out / "measurements.parquet").exists() else None
    if df is None:
        raise FileNotFoundError(f"no {out / 'measurements.parquet'}: give the output folder of kneebatch run or measure")
    failures = pd.read_parquet(out / "failures.parquet") if (out / "failures.parquet").exists() else pd.DataFrame()
    store_path = Path(store) if store else store_of(out)
    cohort_store = CohortStore(store_path, create=False) if store_path and store_path.exists() else None
    table = stats.join(df, pd.read_parquet(clinical) if clinical else None)
    if by is not None and by not in table:  # asked for by name: a typo is no silent omission
        raise ValueError(f"--by {by}: no such column in the measurements or the clinical table"
                         f"{'' if clinical else ' (give --clinical for its columns)'}")
    by = by or "group"
    measures = stats.default_measures(table)
    shown = [m for m in KEY_MEASURES if m in table] or measures[:6]

    parts = [f"<h1>kneebatch report</h1><p>{len(df)} studies measured, {len(failures)} failed · kneebatch "
             f"{__version__} · made {datetime.now(UTC):%Y-%m-%d %H:%M} UTC · from <code>{html.escape(out.name)}</code>"
             "</p><p class=note>Studies are named by their pseudonymous keys; volumes in mL, thicknesses in mm.</p>"]
    unmeasured = stats.not_segmented(df)
    if unmeasured:
        made_by = ", ".join(sorted({str(s) for s in df.get("engine_set", pd.Series(dtype=str)).dropna().unique()}))
        parts.append(f"<p class=note>Not segmented by {html.escape(made_by or 'the labels measured')}, so not measured "
                     f"(null, not zero): {html.escape(', '.join(n.replace('_', ' ') for n in unmeasured))}.</p>")
    parts.append('<h2>3-D view</h2><p id="viewer-status">loading...</p><canvas id="viewer"></canvas><div id="tissues"></div>')
    cross = stats.first_visits(table)
    if clinical and by in table and table[by].nunique() >= 2:
        parts.append(f"<h2>Cohort by {html.escape(by)}</h2>" + _table(stats.cohort_table(cross, by)))
        comparison = stats.compare_groups(cross, by, measures, reference)
        cols = ["measure", "group", "reference_n", "reference_median", "reference_q1", "reference_q3", "group_n",
                "group_median", "group_q1", "group_q3", "hl_shift", "hl_ci_low", "hl_ci_high", "cliffs_delta",
                "mannwhitney_p", "mannwhitney_p_holm", "welch_p"]
        ranked = comparison.sort_values("mannwhitney_p")
        # the compact table: each measure's effect with its CI and p; the full one behind a toggle
        compact = pd.DataFrame({"measure": ranked["measure"], "group": ranked["group"],
                                "shift [95 % CI]": [f"{h:.3g} [{lo:.3g}, {hi:.3g}]" for h, lo, hi in
                                                    zip(ranked["hl_shift"], ranked["hl_ci_low"], ranked["hl_ci_high"])],
                                "Cliff's delta": ranked["cliffs_delta"], "p (Holm)": ranked["mannwhitney_p_holm"]})
        parts.append(f"<h2>Measurements by {html.escape(by)}</h2><p class=note>Hodges-Lehmann shift of each group "
                     "against the reference with its 95 % CI; two-sided Mann-Whitney U, Holm-adjusted over the "
                     f"measurements.{' One study per subject (its first visit).' if len(cross) < len(table) else ''}"
                     "</p>" + _table(compact, "compact")
                     + "<details><summary>full table: medians [IQR], n, Welch's t</summary>"
                     + _table(ranked[cols]) + "</details>")
        order = [g for g, _ in stats.groups(cross, by, reference)]
        parts.append('<div class="figure">' + _svg(plots.by_group(cross, by, shown, order)) + "</div>")
        if {"subject_key", "visit_days"} <= set(table) and table.groupby("subject_key")["visit_days"].nunique().max() > 1:
            parts.append("<h2>Change over time</h2><div class=figure>"
                         + _svg(plots.trajectories(table, by, shown, order)) + "</div>")
    if clinical and trend:
        along = stats.trend(cross, trend, measures).sort_values("spearman_p")
        compact = pd.DataFrame({"measure": along["measure"], "n": along["n"], "Spearman rho": along["spearman_rho"],
                                f"slope per {trend} step [95 % CI]": [
                                    f"{b:.3g} [{lo:.3g}, {hi:.3g}]" for b, lo, hi in
                                    zip(along["slope_per_grade"], along["slope_ci_low"], along["slope_ci_high"])],
                                "p (Holm)": along["spearman_p_holm"]})
        parts.append(f"<h2>Trend along {html.escape(trend)}</h2><p class=note>Spearman's rho and the least-squares "
                     f"slope per step of {html.escape(trend)}, Holm-adjusted over the measurements.</p>"
                     + _table(compact, "compact") + '<div class="figure">'
                     + _svg(plots.along_grade(cross, trend, shown)) + "</div>")
    if not (clinical and by in table and table[by].nunique() >= 2):
        summary = pd.DataFrame([{"measure": m, **stats.describe(stats.values(table, m))} for m in measures])
        parts.append("<h2>Measurements</h2>" + _table(summary))

    # QC
    flagged = df[~df["qc_ok"]] if "qc_ok" in df else df.iloc[:0]
    odd = outliers(df, shown)
    empty = [(k, f) for k, flags in zip(df["study_key"], df.get("qc_flags", [])) for f in flags if f.startswith("missing:")]
    parts.append(f"<h2>Quality control</h2><p>{len(flagged)} of {len(df)} studies carry QC flags; {len(odd)} "
                 f"measurements are outliers (robust z beyond ±{ROBUST_Z}); {len(empty)} empty tissues; "
                 f"{len(failures)} studies failed.</p>")
    if len(flagged):
        parts.append(_table(flagged[["study_key", "qc_flags"]], "small"))
    if len(odd):
        parts.append("<h3>Outliers</h3>" + _table(odd, "small"))
    if len(failures):
        cols = [c for c in ("study_key", "stage", "reason", "message") if c in failures]
        parts.append("<h3>Failures</h3>" + _table(failures[cols], "small"))

    # studies: the flagged and outlying first
    first = list(dict.fromkeys([*odd.get("study_key", []), *flagged["study_key"]]))
    keys = list(dict.fromkeys([*first, *sorted(df["study_key"])]))[: max(study_pages, len(first))]
    with_mesh = set(keys[:meshes]) if cohort_store is not None else set()
    # the joined table where it has one row per study: each study's heading shows its group and KL grade
    joined = table if "study_key" in table and table["study_key"].is_unique and len(table) == len(df) else df
    rows = joined.set_index("study_key", drop=False)
    parts.append(f"<h2>Studies</h2><p class=note>{len(keys)} of {len(df)} studies: flagged and outlying ones first."
                 f"{' 3-D views for ' + str(len(with_mesh)) + '.' if with_mesh else ''}</p>")
    for key in keys:
        glb = None
        if key in with_mesh:
            _, labels = cohort_store.chosen_labels(key, rows.loc[key].get("label_name"))
            if labels is not None:
                names = [lab.name for lab in L.LABELS if lab.group != "fat"]  # the joint, not the skin
                glb = glb_bytes(tissue_meshes(labels, cohort_store.grid(key), step=3, bulky_step=6, names=names))
        parts.append(_study_section(cohort_store, key, rows.loc[key], shown, glb, outline))

    three = (ASSETS / "three.bundle.min.js").read_text()
    document = ("<!DOCTYPE html>\n<!-- kneebatch report -->\n<html lang=en><head><meta charset=utf-8>"
                f"<title>kneebatch report: {html.escape(out.name)}</title><style>{CSS}</style></head><body>"
                + "".join(parts)
                + f"<script>{three}</script><script>{VIEWER_JS}</script></body></html>")
    write_text_atomic(path, document)
    return path
