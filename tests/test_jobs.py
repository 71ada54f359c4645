"""The job skeleton: shards of the study keys, part files, gathering, merge and status."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest

from kneebatch.cli import main
from kneebatch.ingest.store import CohortStore, segmentation_name
from kneebatch.jobs.measure import measure_store
from kneebatch.jobs.merge import merge
from kneebatch.jobs.parts import Parts
from kneebatch.jobs.run import run
from kneebatch.jobs.shards import Shard
from kneebatch.jobs.status import job_status
from kneebatch.outputs import FAILURE_SCHEMA, read_rows
from tests.conftest import comparable


def test_shards_partition_the_keys_exactly_once_and_stably():
    keys = [f"k{i:05d}" for i in range(2000)]
    for n in (1, 2, 7):
        taken = [Shard(i, n).select(keys) for i in range(n)]
        assert sorted(k for part in taken for k in part) == keys  # each key in exactly one shard
        assert min(len(p) for p in taken) > 0.8 * len(keys) / n  # and evenly spread
    assert Shard.parse(" 3/8 ") == Shard(3, 8) and str(Shard(3, 8)) == "3/8"
    assert Shard(1, 3).select(keys) == Shard.parse("1/3").select(list(reversed(keys)))[::-1]  # order-free
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="i/N"):
            Shard.parse(bad)


def test_gather_keeps_the_last_save_of_a_study_and_drops_failures_of_studies_with_a_row(tmp_path):
    schema = pa.schema([pa.field("study_key", pa.string(), nullable=False), pa.field("x", pa.float64())])
    parts = Parts(tmp_path, schema)
    fail = {"study_key": "b", "stage": "run", "reason": "internal_error", "message": "m"}
    parts.save(["a", "b"], [{"study_key": "a", "x": 1.0}], [fail])
    parts.save(["b"], [{"study_key": "b", "x": 2.0}], [])  # b succeeds on a re-run
    parts.save(["a"], [{"study_key": "a", "x": 3.0}], [])  # a saved twice: the later counts
    parts.save(["c"], [], [{**fail, "study_key": "c"}])
    rows, failures = parts.gather()
    assert rows.to_pylist() == [{"study_key": "a", "x": 3.0}, {"study_key": "b", "x": 2.0}]
    assert failures.schema == FAILURE_SCHEMA and failures["study_key"].to_pylist() == ["c"]
    assert parts.done_keys() == {"a", "b"}


def test_two_shards_merged_equal_one_whole_run(store, tiny_engines, tmp_path):
    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    whole = run(work, tmp_path / "whole", engines_path=tiny_engines, batch_size=2, show_progress=False)
    assert whole.segmented == 6
    out = tmp_path / "sharded"
    # shard 1 first; the final tables come only from merge
    r1 = run(work, out, engines_path=tiny_engines, batch_size=2, show_progress=False, shard=Shard(1, 2))
    assert not (out / "measurements.parquet").exists()
    with pytest.raises(ValueError, match="shards 0/2 have not finished"):
        merge(out)
    assert [s["state"] for s in job_status(out)["shards"]] == ["missing", "finished"]
    r0 = run(work, out, engines_path=tiny_engines, batch_size=2, show_progress=False, shard=Shard(0, 2))
    assert r0.studies + r1.studies == 6 and r0.segmented + r1.segmented == 6 and min(r0.studies, r1.studies) > 0
    m = merge(out)
    assert (m["shards"], m["rows"], m["failed"]) == (2, 6, 0)
    assert comparable(read_rows(out / "measurements.parquet")) == comparable(
        read_rows(tmp_path / "whole" / "measurements.parquet"))
    status = job_status(out)
    assert status["merged"] and [s["saved"] for s in status["shards"]] == [r0.studies, r1.studies]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["outputs"]["measurements.parquet"]["rows"] == 6 and len(prov["shards"]) == 2
    # a resubmitted shard resumes: nothing is segmented again
    again = run(work, out, engines_path=tiny_engines, batch_size=2, show_progress=False, shard=Shard(0, 2))
    assert (again.segmented, again.already_done) == (0, r0.studies)
    with pytest.raises(ValueError, match="--force"):
        run(work, out, engines_path=tiny_engines, show_progress=False, shard=Shard(0, 2), force=True)


def test_measure_resumes_and_shards_from_the_command_line(store, tmp_path, capsys):
    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    s = CohortStore(work)
    keys = s.study_keys()
    for k in keys[:4]:  # two studies without labels: failure rows
        s.write_labels(k, np.ones(s.grid(k).shape, np.uint8), {"model_hash": "aaaa+bbbb"}, name=segmentation_name("aaaa+bbbb"))
    first = measure_store(work, tmp_path / "m", show_progress=False)
    assert (first.measured, first.failed, first.already_done) == (4, 2, 0)
    again = measure_store(work, tmp_path / "m", show_progress=False)
    assert (again.measured, again.already_done, again.failed) == (0, 4, 2)
    assert len(read_rows(tmp_path / "m" / "measurements.parquet")) == 4
    with pytest.raises(ValueError, match="other label_name"):
        measure_store(work, tmp_path / "m", label_name=segmentation_name("aaaa+bbbb"), show_progress=False)
    for i in (0, 1):
        assert main(["measure", str(work), str(tmp_path / "ms"), "--shard", f"{i}/2", "-q", "--workers", "1"]) == 0
    assert "kneebatch merge" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "ms")]) == 0
    assert comparable(read_rows(tmp_path / "ms" / "measurements.parquet")) == comparable(
        read_rows(tmp_path / "m" / "measurements.parquet"))
    assert read_rows(tmp_path / "ms" / "failures.parquet") == read_rows(tmp_path / "m" / "failures.parquet")
    assert main(["status", str(tmp_path / "ms")]) == 0
    assert "merged" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse refuses it, with the i/N rule
        main(["run", str(work), str(tmp_path / "x"), "--shard", "2/2"])
    assert "0 <= i < N" in capsys.readouterr().err


def test_a_convert_in_two_shards_merged_equals_one_whole_convert(cohort, key_file, tmp_path):
    from kneebatch.jobs.convert import convert, merge_store

    whole = convert(cohort / "dicom", tmp_path / "whole.zarr", key_file=key_file, show_progress=False)
    parts = [convert(cohort / "dicom", tmp_path / "sharded.zarr", key_file=key_file, show_progress=False,
                     shard=Shard(i, 2)) for i in (1, 0)]
    assert sum(p.converted for p in parts) == whole.converted == 6 and min(p.converted for p in parts) > 0
    assert all(p.studies_found == 6 for p in parts)  # every shard scans everything, converts its own
    assert merge_store(tmp_path / "sharded.zarr") == {"shards": 2, "studies": 6, "failed": 0}
    a, b = CohortStore(tmp_path / "whole.zarr"), CohortStore(tmp_path / "sharded.zarr")
    assert a.study_keys() == b.study_keys()
    assert read_rows(a.keymap_path) == read_rows(b.keymap_path)
    for k in a.study_keys():
        assert np.array_equal(a.read_image(k)[0], b.read_image(k)[0])
    assert main(["merge", str(tmp_path / "sharded.zarr")]) == 0  # again: the same tables
    assert read_rows(a.keymap_path) == read_rows(b.keymap_path)
    status = job_status(tmp_path / "sharded.zarr")
    assert status["command"] == "convert" and status["merged"]


def test_a_store_lists_its_studies_from_one_index_file(store, tmp_path):
    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    s = CohortStore(work)
    keys = s.study_keys()
    assert len(keys) == 6 and sorted(s.index_path.read_text().split()) == keys
    s.index_path.unlink()  # a store from before the index: listed by its folders
    assert CohortStore(work).study_keys() == keys
    image, grid = s.read_image(keys[0])
    new = "s" + "0" * (len(keys[0]) - 1)
    s.write_study(new, image, grid, s.channels(keys[0]), {})  # the first write builds the index whole
    assert sorted(s.index_path.read_text().split()) == sorted([*keys, new]) == CohortStore(work).study_keys()


def test_submit_and_merge_refuse_what_cannot_work_before_anything_is_submitted(cohort, store, key_file, tmp_path,
                                                                                capsys):
    from kneebatch.jobs.convert import convert

    # a job that would fail in every task is refused at submit time, and leaves nothing behind
    assert main(["submit", "run", str(store), str(tmp_path / "r"), "--force", "--slurm", "--shards", "2"]) == 2
    assert "other shards' work" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert main(["submit", "run", str(tmp_path / "nostore.zarr"), str(tmp_path / "r"), "--slurm"]) == 2
    assert "no cohort store" in capsys.readouterr().err and not (tmp_path / "r").exists()
    # merge and status speak of jobs with shards only
    (tmp_path / "synth").mkdir()
    from kneebatch.outputs import claim_output_dir

    claim_output_dir(tmp_path / "synth", "synth", {})
    for command in ("merge", "status"):
        assert main([command, str(tmp_path / "synth")]) == 2
        assert "'kneebatch synth'" in capsys.readouterr().err
    # a store made with one secret never gets a new secret made for it
    convert(cohort / "dicom", tmp_path / "s.zarr", key_file=key_file, show_progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        convert(cohort / "dicom", tmp_path / "s.zarr", key_file=tmp_path / "other.key", show_progress=False)
    assert not (tmp_path / "other.key").exists()


def test_status_understands_whole_runs_and_merge_names_unfinished_shards(store, tiny_engines, tmp_path, capsys):
    """A finished run without shards is 'finished' (not '0/1 missing'); one stopped part way is
    'unfinished' and says how to resume; merge of a submitted array names every unfinished shard."""
    from kneebatch.jobs.slurm import progress_line

    store = shutil.copytree(store, tmp_path / "store.zarr")  # the session's store keeps no label maps
    out = tmp_path / "whole"
    run(store, out, engines_path=tiny_engines, show_progress=False)
    [whole] = job_status(out)["shards"]
    prov = json.loads((out / "provenance.json").read_text())
    assert whole == {"shard": "whole", "state": "finished", "studies": 6, "saved": 6, "failed": 0,
                     "studies_per_s": prov["studies_per_s"], "updated_utc": prov["created_utc"]}
    assert prov["studies_per_s"] == pytest.approx(6 / prov["seconds"], rel=0.05) and prov["studies_per_s"] > 0
    assert not (out / "progress").exists()  # its record gone, the folder too
    assert main(["status", str(out)]) == 0
    assert "finished: the final tables are written" in " ".join(capsys.readouterr().out.split())
    (out / "provenance.json").unlink()  # as if stopped before gathering
    [whole] = job_status(out)["shards"]
    assert whole["state"] == "unfinished" and whole["saved"] == 6
    assert main(["status", str(out)]) == 0
    assert "rerun the same command to resume" in " ".join(capsys.readouterr().out.split())
    assert job_status(store)["shards"][0] == {"shard": "whole", "state": "finished", "studies": 6, "saved": 6,
                                              "failed": 0}
    # a submitted array whose tasks have started (OUT claimed) and none finished
    array = tmp_path / "array"
    run(store, array, engines_path=tiny_engines, show_progress=False, shard=Shard(0, 3))
    shutil.rmtree(array / "shards")
    (array / "slurm").mkdir()
    (array / "slurm" / "submit.json").write_text(json.dumps({"command": ["run"], "shards": 3, "jobs": []}))
    with pytest.raises(ValueError, match="shards 0/3, 1/3, 2/3 have not finished"):
        merge(array)
    # submit --wait's live line
    (array / "shards").mkdir()
    (array / "shards" / "shard-00000-of-00003.json").write_text(json.dumps({"report": {
        "shard": "0/3", "studies": 2, "saved": 2, "already_done": 0, "failed": 0, "seconds": 4.0,
        "studies_per_s": 0.5}}))
    assert progress_line(array, 3, {1: "RUNNING", 2: "PENDING"}) == \
        "1/3 shards finished (2 studies, 0.50 studies/s), 1 running, 1 pending"
    assert progress_line(array, 3, None).endswith("SLURM's queue cannot be asked")
    # a running shard's progress (written as each batch is saved) joins the line and the status
    (array / "progress").mkdir()
    (array / "progress" / "shard-00001-of-00003.json").write_text(json.dumps({
        "shard": "1/3", "studies": 2, "saved": 1, "failed": 0, "seconds": 4.0, "studies_per_s": 0.25,
        "updated_utc": "2026-12-05T10:00:00Z"}))
    assert progress_line(array, 3, {1: "RUNNING", 2: "PENDING"}) == \
        "1/3 shards finished (3 studies, 0.25 studies/s), 1 running, 1 pending"
    running = job_status(array)["shards"][1]
    assert running["saved"] == 1 and running["studies"] == 2 and running["studies_per_s"] == 0.25


def test_a_running_job_saves_its_progress_as_each_batch_is_saved(store, tiny_engines, tmp_path):
    from kneebatch.jobs.segment import process_batch

    store = shutil.copytree(store, tmp_path / "store.zarr")
    out = tmp_path / "out"
    seen = []

    def watched(keys, **kwargs):
        record = out / "progress" / "shard-00000-of-00001.json"
        seen.append(json.loads(record.read_text())["saved"] if record.exists() else None)
        return process_batch(keys, **kwargs)

    run(store, out, engines_path=tiny_engines, show_progress=False, batch_size=2, batch_fn=watched)
    assert seen == [None, 2, 4]  # before each batch: what the earlier ones saved
    assert not (out / "progress" / "shard-00000-of-00001.json").exists()  # finished: the record is gone


def test_tasks_are_an_even_share_per_worker():
    from kneebatch.jobs.run import even_batches

    keys = [f"k{i}" for i in range(6)]
    assert [len(b) for b in even_batches(keys, 4, 2)] == [3, 3]
    assert [len(b) for b in even_batches(keys, 4, 1)] == [4, 2]
    assert [len(b) for b in even_batches(keys * 4, 4, 2)] == [4] * 6  # a cohort: batch_size rules
    assert [len(b) for b in even_batches(keys[:1], 4, 8)] == [1]
    assert sum(even_batches(keys * 4, 4, 3), []) == keys * 4  # every study once, in order
