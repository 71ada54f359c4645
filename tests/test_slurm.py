"""The SLURM array path against a real SLURM: cluster/local-slurm.sh starts one on this machine
(Debian slurm-wlm + munge, root). Without it these tests are skipped, and say why."""

import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kneebatch.cli import main
from kneebatch.jobs.run import run
from kneebatch.jobs.status import job_status
from kneebatch.outputs import read_rows
from tests.conftest import comparable

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed (apt-get install -y slurm-wlm munge; .ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM runs its daemons as root")
    folder = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_LOCAL_PORT": str(random.randrange(20000, 30000, 2))}
    started = subprocess.run(["bash", str(ROOT / "cluster" / "local-slurm.sh"), "start", str(folder)],
                             capture_output=True, text=True, env=env)
    if started.returncode != 0:
        pytest.skip(f"the local SLURM did not start: {started.stderr.strip()[-300:]}")
    conf = started.stdout.strip().split("=", 1)[1]
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield folder
    subprocess.run(["bash", str(ROOT / "cluster" / "local-slurm.sh"), "stop", str(folder)], env=env)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def _job(work, out, engines):
    return ["run", str(work), str(out), "--engines", str(engines), "--workers", "1", "--batch-size", "2",
            "--threads", "1"]


def test_an_array_run_merges_to_exactly_the_local_run(slurm, store, tiny_engines, tmp_path, capsys):
    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    local = run(work, tmp_path / "local", engines_path=tiny_engines, batch_size=2, threads=1, show_progress=False)
    out = tmp_path / "array"
    assert main(["submit", *_job(work, out, tiny_engines), "--slurm", "--shards", "2", "--wait"]) == 0
    assert "2 shards merged: 6 rows, 0 failed, 0 failed at convert" in capsys.readouterr().out
    rows = read_rows(out / "measurements.parquet")
    assert len(rows) == local.segmented == 6 and len({r["study_key"] for r in rows}) == 6  # exactly once
    assert comparable(rows) == comparable(read_rows(tmp_path / "local" / "measurements.parquet"))
    record = json.loads((out / "slurm" / "submit.json").read_text())
    assert record["shards"] == 2 and len(list((out / "slurm").glob("*_*.log"))) == 2
    assert "#SBATCH --array=0-1" in (out / "slurm" / "array.sbatch").read_text()
    assert [s["state"] for s in job_status(out)["shards"]] == ["finished", "finished"]
    assert main(["submit", *_job(work, out, tiny_engines), "--slurm"]) == 2  # one submission per OUT


def test_a_cancelled_shard_is_failed_in_status_and_a_resubmit_finishes_it(slurm, store, tiny_engines, tmp_path,
                                                                          capsys):
    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    out, release = tmp_path / "array", tmp_path / "release"
    hold = f'[ "$SLURM_ARRAY_TASK_ID" != 1 ] || [ -e {release} ] || sleep 300'  # shard 1 waits, until released
    assert main(["submit", *_job(work, out, tiny_engines), "--slurm", "--shards", "2", "--setup", hold]) == 0
    job_id = json.loads((out / "slurm" / "submit.json").read_text())["jobs"][0]["job_id"]
    deadline = time.time() + 180
    while time.time() < deadline and [s["state"] for s in job_status(out)["shards"]] != ["finished", "running"]:
        time.sleep(1)
    assert [s["state"] for s in job_status(out)["shards"]] == ["finished", "running"]
    subprocess.run(["scancel", f"{job_id}_1"], check=True)
    while time.time() < deadline and job_status(out)["shards"][1]["state"] != "failed":
        time.sleep(1)
    assert [s["state"] for s in job_status(out)["shards"]] == ["finished", "failed"]
    assert main(["merge", str(out)]) == 2  # not before every shard has finished
    release.touch()
    capsys.readouterr()
    assert main(["submit", "--resubmit", str(out), "--wait"]) == 0
    printed = capsys.readouterr().out
    assert "resubmitted shards 1" in printed and "2 shards merged: 6 rows, 0 failed," in printed
    assert len(json.loads((out / "slurm" / "submit.json").read_text())["jobs"]) == 2
    assert len(read_rows(out / "measurements.parquet")) == 6


def test_a_jobqueue_run_on_slurm_workers_equals_the_local_run(slurm, store, tiny_engines, tmp_path, monkeypatch):
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is not installed (pip install 'kneebatch[slurm]')")
    monkeypatch.chdir(tmp_path)  # the worker jobs' slurm-<id>.out logs land in the submitting folder
    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    run(work, tmp_path / "local", engines_path=tiny_engines, batch_size=2, threads=1, show_progress=False)
    out = tmp_path / "jobqueue"
    assert main(["run", str(work), str(out), "--engines", str(tiny_engines), "--cluster", "slurm", "--workers", "2",
                 "--batch-size", "2", "--mem", "3GB", "-q"]) == 0
    assert comparable(read_rows(out / "measurements.parquet")) == comparable(
        read_rows(tmp_path / "local" / "measurements.parquet"))
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["threads"] is None  # each worker took its SLURM allocation's cores


def test_an_array_run_with_another_tools_model_equals_the_local_run(slurm, small_store, tmp_path, capsys):
    """--model with an nnU-Net folder as a two-shard SLURM array: the same rows and label maps as
    one local run of it (the store's maps are named by the model's hash: one map per study)."""
    pytest.importorskip("nnunetv2", reason="the nnunet extra: pip install 'kneebatch[nnunet]'")
    from kneebatch.ingest.store import CohortStore
    from tests.nnunet_model import write_model

    model = write_model(tmp_path / "model", folds=(0,), steps=30)
    local_store, array_store = tmp_path / "local.zarr", tmp_path / "array.zarr"
    shutil.copytree(small_store, local_store)
    shutil.copytree(small_store, array_store)
    assert main(["run", str(local_store), str(tmp_path / "local"), "--model", str(model), "-q"]) == 0
    out = tmp_path / "array"
    assert main(["submit", "run", str(array_store), str(out), "--model", str(model), "--workers", "1", "--threads", "1",
                 "--slurm", "--shards", "2", "--wait"]) == 0
    assert "2 shards merged: 2 rows, 0 failed" in capsys.readouterr().out
    rows = read_rows(out / "measurements.parquet")
    assert comparable(rows) == comparable(read_rows(tmp_path / "local" / "measurements.parquet"))
    local, array = CohortStore(local_store, create=False), CohortStore(array_store, create=False)
    for row in rows:
        assert row["engine_set"].startswith("nnunet:") and row["femur_volume_mm3"] > 0
        assert (array.read_labels(row["study_key"], row["label_name"])
                == local.read_labels(row["study_key"], row["label_name"])).all()


def test_an_array_convert_builds_the_store_a_local_convert_builds(slurm, cohort, key_file, tmp_path, capsys):
    from kneebatch.ingest.store import CohortStore
    from kneebatch.jobs.convert import convert

    convert(cohort / "dicom", tmp_path / "local.zarr", key_file=key_file, show_progress=False)
    capsys.readouterr()
    assert main(["submit", "convert", str(cohort / "dicom"), str(tmp_path / "array.zarr"), "--key-file", str(key_file),
                 "--workers", "1", "--slurm", "--shards", "2", "--wait"]) == 0
    assert "2 shards merged: 6 studies in the store, 0 failed" in capsys.readouterr().out
    a, b = CohortStore(tmp_path / "local.zarr"), CohortStore(tmp_path / "array.zarr")
    assert a.study_keys() == b.study_keys() and read_rows(a.keymap_path) == read_rows(b.keymap_path)
    assert all(a.grid(k).same_as(b.grid(k)) for k in a.study_keys())
