"""Public label sets that annotate part of the schema: their layouts, ids and the marginal loss.

The OAI-ZIB and SKM-TEA files here are written by these tests as those data sets ship them
(a pose-less MetaImage in the DESS's voxel order named by the OAI patient ID; a NIfTI named by
the scan ID in segmentation_masks/dicom-track), not by kneebatch's writers.
"""

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from kneebatch import labels as L
from kneebatch.geometry import Reorientation, affine_to_nifti
from kneebatch.ingest.datasets import import_dataset_labels
from kneebatch.ingest.label_import import label_file, read_label_file, study_names
from kneebatch.ingest.store import CohortStore
from kneebatch.jobs.convert import convert
from kneebatch.label_sets import LABEL_SETS, label_set_from_map, parse_label_set
from kneebatch.outputs import read_rows
from kneebatch.synth.cohort import generate_cohort
from kneebatch.training.losses import MarginalDiceCE

OAI_ZIB = LABEL_SETS["oai-zib"]
SKM_TEA = LABEL_SETS["skm-tea"]


def test_label_sets_sum_every_schema_label_into_exactly_one_class():
    for ls in LABEL_SETS.values():
        m = ls.membership()
        assert m.shape == (len(ls.classes) + 1, L.N_CLASSES) and np.array_equal(m.sum(0), np.ones(L.N_CLASSES))
        assert ls.is_partial
    m = OAI_ZIB.membership()
    tib = [L.by_name("medial_tibial_cartilage").id, L.by_name("lateral_tibial_cartilage").id]
    assert m[4, tib].tolist() == [1, 1] and m[0, L.by_name("patella").id] == 1 and m[0, 0] == 1
    assert OAI_ZIB.class_names() == ["background", "femur", "femoral_cartilage", "tibia",
                                     "medial_tibial_cartilage+lateral_tibial_cartilage"]
    assert OAI_ZIB.schema_to_class()[L.by_name("lateral_tibial_cartilage").id] == 4


def test_label_map_text_decides_full_or_partial():
    assert label_set_from_map("oai-zib") is OAI_ZIB and label_set_from_map("SKM-TEA") is SKM_TEA
    full = ",".join(f"{lab.id}:{lab.name}" for lab in L.LABELS)
    assert label_set_from_map(full) is None  # one to one onto every label: full labels
    assert label_set_from_map("1:femur,9:background") is None  # a translation (measure's syntax)
    custom = label_set_from_map("1:femur,2:tibia+fibula")
    assert custom.ids == {1: (1,), 2: (2, 3)}
    for bad in ("1:femur,1:tibia", "0:femur", "1:femur,2:femur", "1:kneecap", "x:femur", ""):
        with pytest.raises(ValueError):
            parse_label_set(bad)


def test_marginal_loss_does_not_punish_unannotated_tissues():
    """A voxel the file calls background may be any tissue the set does not annotate."""
    loss = MarginalDiceCE(OAI_ZIB.membership())
    target = torch.zeros(1, 1, 2, 2, 2, dtype=torch.long)
    target[0, 0, 0] = 1  # half the voxels femur
    muscle = torch.full((1, L.N_CLASSES, 2, 2, 2), -20.0)
    muscle[:, L.by_name("quadriceps_muscle").id] = 20.0  # background half: confidently muscle
    muscle[:, L.by_name("femur").id, 0] = 40.0
    background = muscle.clone()
    background[:, 0, 1] = 40.0  # the same, but the background half called background
    assert float(loss(muscle, target)) == pytest.approx(float(loss(background, target)), abs=1e-4)
    assert float(loss(muscle, target)) < 0.01
    wrong = muscle.clone()
    wrong[:, L.by_name("tibia").id, 1] = 60.0  # an annotated class where the file says background: punished
    assert float(loss(wrong, target)) > 1.0


@pytest.fixture(scope="module")
def dess_store(tmp_path_factory, key_file):
    root = tmp_path_factory.mktemp("zib")
    generate_cohort(root / "cohort", 2, seed=77, preset="small", protocol="oai", workers=1)
    convert(root / "cohort" / "dicom", root / "store.zarr", key_file=key_file, show_progress=False)
    return root


def _truth(root, store, key):
    uid = {r["study_key"]: r["study_uid"] for r in read_rows(store.keymap_path)}[key]
    truth, _ = read_label_file(label_file(root / "cohort" / "truth", [uid]), store.grid(key))
    return truth


def _write_mhd_as_zib_ships_it(path, itk_array):
    """A MetaImage with no pose: identity direction, zero offset (the OAI-ZIB README)."""
    a0, a1, a2 = itk_array.shape
    raw = path.with_name(path.name.replace(".mhd", ".raw"))
    path.write_text("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
                    "CompressedData = False\nTransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = 0 0 0\n"
                    f"ElementSpacing = 1 1 1\nDimSize = {a2} {a1} {a0}\nElementType = MET_UCHAR\n"
                    f"ElementDataFile = {raw.name}\n")
    raw.write_bytes(np.ascontiguousarray(itk_array, dtype=np.uint8).tobytes())


def test_oai_zib_masks_land_on_the_study_grid_exactly(dess_store):
    store = CohortStore(dess_store / "store.zarr")
    zib = dess_store / "zib" / "segmentation_masks"
    zib.mkdir(parents=True)
    lut = np.zeros(L.N_CLASSES, np.uint8)
    for name, i in (("femur", 1), ("femoral_cartilage", 2), ("tibia", 3), ("medial_tibial_cartilage", 4),
                    ("lateral_tibial_cartilage", 4)):
        lut[L.by_name(name).id] = i
    expected = {}
    for key in store.study_keys():
        truth = _truth(dess_store, store, key)
        expected[key] = lut[truth]
        attrs = store.study_attrs(key)
        source = Reorientation.from_attrs(attrs["to_canonical"]).invert(lut[truth], None)  # [slice, row, col]
        itk = source.transpose(1, 2, 0)[::-1]  # ITK's [row bottom-to-top, column, slice]
        patient = [n for n in study_names(store, folders=True)[key] if n.startswith("9")][0]
        _write_mhd_as_zib_ships_it(zib / f"{patient}.segmentation_masks.mhd", itk)
    n, missing = import_dataset_labels(dess_store / "store.zarr", dess_store / "zib", OAI_ZIB, "zib")
    assert n == 2 and missing == []
    for key in store.study_keys():
        got = store.read_labels(key, "zib")
        assert np.array_equal(got, expected[key])
        assert store.label_attrs(key, "zib")["label_set"] == "oai-zib"


def test_oai_zib_mask_of_another_scan_is_refused(dess_store, tmp_path):
    store = CohortStore(dess_store / "store.zarr")
    key = store.study_keys()[0]
    zib = tmp_path / "segmentation_masks"
    zib.mkdir()
    patient = [n for n in study_names(store, folders=True)[key] if n.startswith("9")][0]
    _write_mhd_as_zib_ships_it(zib / f"{patient}.segmentation_masks.mhd", np.zeros((10, 12, 14), np.uint8))
    from kneebatch.errors import StudyError

    with pytest.raises(StudyError, match="label_geometry_mismatch|voxels"):
        import_dataset_labels(dess_store / "store.zarr", tmp_path, OAI_ZIB, "zib2")


def test_skm_tea_masks_found_by_scan_folder_and_read_with_their_geometry(tmp_path, key_file):
    generate_cohort(tmp_path / "cohort", 2, seed=78, preset="small", protocol="skmtea", workers=1)
    dicoms = tmp_path / "skm-tea" / "dicoms"
    masks = tmp_path / "skm-tea" / "segmentation_masks" / "dicom-track"
    masks.mkdir(parents=True)
    studies = sorted(p for p in (tmp_path / "cohort" / "dicom").glob("*/*/*"))
    for i, study in enumerate(studies):
        shutil.copytree(study, dicoms / f"MTR_{i:03d}")
    convert(dicoms, tmp_path / "store.zarr", key_file=key_file, show_progress=False)
    store = CohortStore(tmp_path / "store.zarr")
    lut = np.zeros(L.N_CLASSES, np.uint8)
    for name, i in (("patellar_cartilage", 1), ("femoral_cartilage", 2), ("medial_tibial_cartilage", 3),
                    ("lateral_tibial_cartilage", 4), ("medial_meniscus", 5), ("lateral_meniscus", 6)):
        lut[L.by_name(name).id] = i
    uid = {r["study_key"]: (r["study_uid"], r["source_path"]) for r in read_rows(store.keymap_path)}
    expected = {}
    for key in store.study_keys():
        truth, _ = read_label_file(label_file(tmp_path / "cohort" / "truth", [uid[key][0]]), store.grid(key))
        expected[key] = lut[truth]
        scan = [p for p in uid[key][1].split("/") if p.startswith("MTR_")][0]
        grid = store.grid(key)
        # as SKM-TEA's NIfTI files: the scan's own voxel order (x = rows SI, y = columns AP, z = LR), via nibabel
        nib.save(nib.Nifti1Image(lut[truth].transpose(2, 1, 0), affine_to_nifti(grid.affine)), masks / f"{scan}.nii.gz")
    n, missing = import_dataset_labels(tmp_path / "store.zarr", tmp_path / "skm-tea", SKM_TEA, "skm")
    assert n == 2 and missing == []
    for key in store.study_keys():
        assert np.array_equal(store.read_labels(key, "skm"), expected[key])
    # gzipped, as the data set ships them
    written = list(masks.glob("*.nii.gz"))
    assert len(written) == 2 and all(p.read_bytes()[:2] == b"\x1f\x8b" for p in written)


def test_a_partial_set_is_never_measured_as_the_schema(dess_store, tmp_path):
    """OAI-ZIB's 3 is the tibia; kneebatch's 3 is the fibula: measuring the raw ids would be wrong numbers."""
    from kneebatch.errors import StudyError
    from kneebatch.jobs.measure import measure_store

    store = CohortStore(dess_store / "store.zarr")
    key = store.study_keys()[0]
    store.write_labels(key, np.ones(store.grid(key).shape, np.uint8), {"label_set": "oai-zib"}, name="oai-zib")
    with pytest.raises(StudyError, match="partial_label_set"):
        store.read_schema_labels(key, "oai-zib")
    report = measure_store(dess_store / "store.zarr", tmp_path / "m", label_name="oai-zib", show_progress=False)
    rows = read_rows(tmp_path / "m" / "failures.parquet")
    assert report.measured == 0 and "partial_label_set" in {r["reason"] for r in rows}


def test_synth_never_mixes_two_cohorts_in_one_folder(tmp_path):
    generate_cohort(tmp_path / "c", 1, seed=3, preset="small", workers=1)
    generate_cohort(tmp_path / "c", 2, seed=3, preset="small", workers=1)  # the same cohort, one more study
    with pytest.raises(ValueError, match="other"):
        generate_cohort(tmp_path / "c", 1, seed=3, preset="small", protocol="pdfs", workers=1)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        generate_cohort(tmp_path / "mine", 1, seed=3, preset="small", workers=1)


def test_keep_unannotated_holds_the_split_of_the_background_as_it_was():
    from kneebatch.training.losses import KeepUnannotated

    keep = KeepUnannotated(OAI_ZIB.membership())
    target = torch.zeros(1, 1, 2, 2, 2, dtype=torch.long)
    target[0, 0, 0] = 1
    initial = torch.randn(1, L.N_CLASSES, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    assert float(keep(initial, initial, target)) == pytest.approx(0.0, abs=1e-6)
    annotated_only = initial.clone()
    annotated_only[:, L.by_name("femur").id] += 5.0  # an annotated class: the marginal loss's business
    assert float(keep(annotated_only, initial, target)) == pytest.approx(0.0, abs=1e-5)
    drifted = initial.clone()
    drifted[:, L.by_name("patellar_tendon").id, 1] += 5.0  # background voxels turning to tendon
    assert float(keep(drifted, initial, target)) > 0.1
