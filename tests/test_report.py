"""3-D reconstruction, QC images, the HTML report (in headless Chromium) and DICOM SEG."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from kneebatch import labels as L
from tests.conftest import HARD

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """4 studies (shuffled files, extra series, T2 on its own grid): DICOM -> store, the
    generator's label maps imported as ``truth`` and measured."""
    from kneebatch.clinical import pseudonymise_clinical
    from kneebatch.ingest.label_import import import_labels
    from kneebatch.jobs.convert import convert
    from kneebatch.jobs.measure import measure_store
    from kneebatch.synth.cohort import generate_cohort

    root = tmp_path_factory.mktemp("report")
    (root / "study.key").write_text("5e" * 32 + "\n")  # a fixed secret: the same study keys (and order) every run
    generate_cohort(root / "cohort", 4, seed=9090, ranges=HARD, workers=2)
    convert(root / "cohort" / "dicom", root / "store", key_file=root / "study.key", show_progress=False)
    assert import_labels(root / "store", root / "cohort" / "truth", name="truth")[0] == 4
    measure_store(root / "store", root / "out", label_name="truth", show_progress=False)
    pseudonymise_clinical(root / "store", root / "cohort" / "clinical.csv", root / "clinical.parquet",
                          key_file=root / "study.key")
    return root


def _keys(job):
    return sorted(pd.read_parquet(job / "out" / "measurements.parquet")["study_key"])


def test_meshes_enclose_the_label_maps_volume_in_patient_mm(job):
    import trimesh

    from kneebatch.ingest.store import CohortStore
    from kneebatch.mesh import glb_bytes, tissue_meshes

    store = CohortStore(job / "store", create=False)
    for key in _keys(job):
        labels, grid = store.read_schema_labels(key, "truth"), store.grid(key)
        meshes = {m.label.name: m for m in tissue_meshes(labels, grid, step=1)}
        assert set(meshes) == {lab.name for lab in L.LABELS if (labels == lab.id).any()}
        # thin cartilage on ~1.2 mm voxels: the surface runs through its edge voxels' centres
        for name, tol in (("femur", 0.03), ("tibia", 0.03), ("patella", 0.05), ("femoral_cartilage", 0.12)):
            voxels = (labels == L.by_name(name).id).sum() * grid.voxel_volume_mm3
            assert abs(meshes[name].volume_mm3 / voxels - 1) < tol, (key, name, meshes[name].volume_mm3, voxels)
            # where the voxels are, in LPS mm: the mesh's centroid sits on theirs
            index = np.argwhere(labels == L.by_name(name).id).mean(0)
            centre = grid.affine[:3, :3] @ index + grid.affine[:3, 3]
            mesh = trimesh.Trimesh(meshes[name].vertices, meshes[name].faces)
            assert np.linalg.norm(mesh.center_mass - centre) < 1.5, (key, name)
    scene = trimesh.load(trimesh.util.wrap_as_stream(glb_bytes(list(meshes.values()))), file_type="glb")
    assert set(scene.geometry) == set(meshes)
    assert sum(len(g.faces) for g in scene.geometry.values()) == sum(len(m.faces) for m in meshes.values())


def test_mesh_cli(job, tmp_path, capsys):
    from kneebatch.cli import main

    key = _keys(job)[1]
    assert main(["mesh", str(job / "store"), key, str(tmp_path / "m"), "--label-name", "truth",
                 "--tissues", "femur,tibia,patella"]) == 0
    assert "3 tissues" in capsys.readouterr().out
    assert (tmp_path / "m" / f"{key}.glb").stat().st_size > 10_000
    assert (tmp_path / "m" / f"{key}.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["mesh", str(job / "store"), "k" + "0" * 20, str(tmp_path / "n")]) != 0
    assert "no study" in capsys.readouterr().err
    # --run: the label map the measure into out used (truth), not the store's newest
    assert main(["mesh", str(job / "store"), key, str(tmp_path / "r"), "--run", str(job / "out"), "--tissues", "femur"]) == 0
    assert "1 tissues" in (said := capsys.readouterr().out) and "from truth" in said
    assert main(["mesh", str(job / "store"), "k" + "0" * 20, str(tmp_path / "s"), "--run", str(job / "out")]) == 2
    assert "has no row there" in capsys.readouterr().err


def test_qc_slices_show_the_labels_in_their_colours(job, tmp_path):
    import matplotlib.image as mpimg

    from kneebatch import plots
    from kneebatch.ingest.store import CohortStore

    store = CohortStore(job / "store", create=False)
    paths = plots.save(plots.study_slices(store, _keys(job)[0], "truth"), tmp_path, "qc")
    rgb = mpimg.imread(paths[0])[..., :3]
    # the femur's colour, blended over grey, tints many pixels (R > B by its hue: #e3dac9)
    cartilage = np.array([0x4a, 0x90, 0xd9]) / 255  # femoral cartilage: blue over grey
    blue = (rgb[..., 2] - rgb[..., 0] > 0.1) & (np.abs(rgb - cartilage).sum(-1) < 1.0)
    assert blue.sum() > 50
    assert paths[1].read_text().startswith("<?xml")


def test_qc_writes_slices_and_thickness_maps_per_study(job, tmp_path, capsys):
    from kneebatch.cartilage_regions import REGIONS
    from kneebatch.cli import main
    from kneebatch.ingest.store import CohortStore
    from kneebatch.plots import study_thickness_maps

    keys = _keys(job)
    assert main(["qc", str(job / "store"), str(tmp_path / "qc"), "--label-name", "truth", "-q"]) == 0
    assert "wrote 4 QC images" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "qc").glob("*.png")) == sorted(
        [f"{k}.png" for k in keys] + [f"{k}_thickness.png" for k in keys])
    # the maps name every Wirth & Eckstein region of a whole knee (the weight-bearing femur by
    # its thirds) and colour its plates
    figure = study_thickness_maps(CohortStore(job / "store", create=False), keys[0], "truth")
    assert {t.get_text() for ax in figure.axes for t in ax.texts} == set(REGIONS) - {"cMF", "cLF"}
    tibia = figure.axes[0].images[0].get_array()
    assert 1.0 < float(np.ma.median(tibia[tibia > 0])) < 3.5


@pytest.fixture(scope="module")
def report(job):
    from kneebatch.report import build_report

    return build_report(job / "out", clinical=job / "clinical.parquet", meshes=2)


def test_report_is_self_contained_and_names_no_one(job, report):
    text = report.read_text()
    assert "<!-- kneebatch report -->" in text
    # nothing is fetched: no external script, style, image or font
    for needle in ('src="http', "src='http", 'href="http', "@import", "<link "):
        assert needle not in text
    assert text.count('<section class="study"') == 4
    assert text.count('<img alt="cartilage thickness maps of') == 4
    assert text.count('type="application/octet-stream"') == 2  # two 3-D views
    clinical = pd.read_csv(job / "cohort" / "clinical.csv", dtype=str)
    for column in ("subject_id", "study_uid", "study_date"):
        for value in clinical[column]:
            assert value not in text, column
    for f in list((job / "cohort" / "dicom").rglob("*.dcm"))[:3] or [p for p in (job / "cohort" / "dicom").rglob("*")
                                                                   if p.is_file()][:3]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert str(ds.PatientName) not in text and ds.PatientID not in text


def test_report_refuses_to_overwrite_a_file_it_did_not_write(job, tmp_path):
    from kneebatch.report import build_report

    mine = tmp_path / "notes.html"
    mine.write_text("<html>my notes</html>")
    with pytest.raises(ValueError, match="not a kneebatch report"):
        build_report(job / "out", mine)
    assert mine.read_text() == "<html>my notes</html>"


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (CI installs it: apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    """No script error, the 3-D view drew a study, the tables are there; the screenshot's
    canvas holds the tissues' colours."""
    from PIL import Image

    flags = ["--headless", "--no-sandbox", "--enable-unsafe-swiftshader", "--virtual-time-budget=20000",
             "--window-size=1200,900"]
    url = report.resolve().as_uri()
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    assert 'data-viewer="ready"' in body, (body, dom.stderr[-2000:])
    assert "data-error" not in body, body
    assert "Uncaught" not in dom.stderr
    assert "<table" in dom.stdout and "Cohort by group" in dom.stdout
    # the tissue tick boxes: one per tissue of the 3-D view, all shown; #hide= opens with some hidden
    boxes = re.findall(r'<input type="checkbox" data-tissue="(\w+)"', dom.stdout)
    shown = re.search(r'<body[^>]*data-shown="([\w,]*)"', dom.stdout).group(1).split(",")
    assert len(boxes) >= 8 and sorted(shown) == sorted(boxes) and {"femur", "tibia", "patella"} <= set(boxes)
    hidden = subprocess.run([CHROMIUM, *flags, "--dump-dom", url + "#hide=femur,tibia"], capture_output=True,
                            text=True, timeout=180)
    shown_now = re.search(r'<body[^>]*data-shown="([\w,]*)"', hidden.stdout).group(1).split(",")
    assert sorted(shown_now) == sorted(set(boxes) - {"femur", "tibia"})
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=180)
    pixels = np.asarray(Image.open(shot).convert("RGB"), float)
    canvas = pixels[260:720, 40:1150]  # the 3-D view's place in a 1200 x 900 window
    background = np.array([0xF7, 0xF7, 0xF7])
    drawn = np.abs(canvas - background).sum(-1) > 30
    assert drawn.mean() > 0.05, drawn.mean()
    assert (canvas[drawn].std(0) > 10).all()  # shaded, several colours: not a flat fill


def test_dicom_seg_round_trip_on_the_source_series(job, tmp_path, capsys):
    """The SEG's frames are the reference series' slices, in any file order: each frame read
    back by pydicom, placed through its source image's own header, equals the generator's
    truth (NIfTI, read with nibabel) at those positions."""
    import highdicom as hd

    from kneebatch.cli import main

    assert main(["export", str(job / "store"), str(tmp_path / "seg"), "--format", "seg", "--label-name", "truth",
                 "--quiet"]) == 0
    assert "4 DICOM SEG objects" in capsys.readouterr().out
    manifest = json.loads((job / "cohort" / "manifest.json").read_text())
    by_uid = {s["study_uid"]: s for s in manifest["studies"]}
    sources = {}
    for f in (job / "cohort" / "dicom").rglob("*"):
        if f.is_file():
            ds = pydicom.dcmread(f)
            sources[ds.SOPInstanceUID] = ds
    segs = sorted((tmp_path / "seg").glob("*_seg.dcm"))
    assert len(segs) == 4
    for path in segs:
        seg = hd.seg.segread(path)
        assert seg.SegmentationType == "LABELMAP"
        names = [s.SegmentLabel for s in seg.SegmentSequence if s.SegmentNumber > 0]
        assert names == [lab.name for lab in L.LABELS]
        study = by_uid[seg.StudyInstanceUID]
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study["t1_series_uid"]
        truth = nib.load(job / "cohort" / "truth" / f"{seg.StudyInstanceUID}.nii.gz")
        data, to_index = np.asarray(truth.dataobj), np.linalg.inv(truth.affine)
        agree, total = 0, 0
        for i, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
            uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            src = sources[uid]
            rows, cols = np.mgrid[0:src.Rows, 0:src.Columns]
            iop = np.asarray(src.ImageOrientationPatient, float)
            dr, dc = map(float, src.PixelSpacing)
            lps = (np.asarray(src.ImagePositionPatient, float)[:, None, None] + iop[:3, None, None] * cols * dc
                   + iop[3:, None, None] * rows * dr)
            ras = np.stack([-lps[0], -lps[1], lps[2], np.ones_like(lps[0])]).reshape(4, -1)
            ijk = np.rint(to_index @ ras)[:3].astype(int)
            expected = data[ijk[0], ijk[1], ijk[2]].reshape(src.Rows, src.Columns)
            got = seg.pixel_array[i]
            agree += (got == expected).sum()
            total += got.size
        assert agree == total, (path.name, agree / total)


def test_report_is_readable_compact_table_full_one_behind_a_toggle_group_per_study(job, report):
    text = report.read_text()
    clinical = pd.read_parquet(job / "clinical.parquet")
    assert '<table class="compact">' in text and "shift [95 % CI]" in text and "p (Holm)" in text
    assert "<details><summary>full table" in text and "welch_p" in text.split("<details>")[1]
    # every study's heading says its group and KL grade, from the joined clinical table
    for key, group, kl in zip(clinical["study_key"], clinical["group"], clinical["kl_grade"]):
        heading = text.split(f'id="study-{key}"><h3>')[1].split("</h3>")[0]
        assert f"group {group}" in heading and f"kl grade {kl}" in heading


def test_report_trend_along_the_kl_grade(job, tmp_path):
    from kneebatch import stats
    from kneebatch.cli import main

    path = tmp_path / "r.html"
    assert main(["report", str(job / "out"), "--output", str(path), "--clinical", str(job / "clinical.parquet"),
                 "--trend", "kl_grade", "--meshes", "0"]) == 0
    text = path.read_text()
    section = text.split("<h2>Trend along kl_grade</h2>")[1].split("<h2>")[0]
    assert "slope per kl_grade step [95 % CI]" in section and "<svg" in section
    # the table's first row is the measure with the smallest Spearman p, as stats computes it
    joined = pd.read_parquet(job / "out" / "measurements.parquet").merge(pd.read_parquet(job / "clinical.parquet"),
                                                                         on="study_key")
    best = stats.trend(joined, "kl_grade", stats.default_measures(joined)).sort_values("spearman_p").iloc[0]["measure"]
    assert section.split("<tbody><tr><td>")[1].split("</td>")[0] == best


def test_report_refuses_a_grouping_column_it_does_not_have(job, tmp_path, capsys):
    from kneebatch.cli import main

    path = tmp_path / "r.html"
    assert main(["report", str(job / "out"), "--output", str(path), "--clinical", str(job / "clinical.parquet"),
                 "--by", "site", "--meshes", "0"]) == 2
    assert "--by site: no such column" in capsys.readouterr().err and not path.exists()
    assert main(["report", str(job / "out"), "--output", str(path), "--by", "kl_grade", "--meshes", "0"]) == 2
    assert "give --clinical for its columns" in capsys.readouterr().err
