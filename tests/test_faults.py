"""Exactly-once results under real process kills: workers dying mid-batch, a poison study
that kills every worker it meets, and the driver itself killed with SIGKILL."""

import shutil
import signal
import subprocess
import sys
import time
from functools import partial

import pytest

from kneebatch.distributed.cluster import dask_client
from kneebatch.jobs.run import run
from kneebatch.outputs import read_rows
from tests import faulty
from tests.conftest import comparable


def _tables(out):
    rows = read_rows(out / "measurements.parquet")
    failures = read_rows(out / "failures.parquet")
    return rows, failures


def _assert_exactly_once(rows, failures, keys):
    row_keys = [r["study_key"] for r in rows]
    fail_keys = [f["study_key"] for f in failures]
    assert len(row_keys) == len(set(row_keys)) and len(fail_keys) == len(set(fail_keys))
    assert not set(row_keys) & set(fail_keys)
    assert set(row_keys) | set(fail_keys) == set(keys)


@pytest.fixture()
def work_store(store, tmp_path):
    work = tmp_path / "store.zarr"
    shutil.copytree(store, work)
    from kneebatch.ingest.store import CohortStore

    return work, CohortStore(work).study_keys()


def test_worker_killed_mid_batch_loses_nothing(work_store, tiny_engines, tmp_path):
    work, keys = work_store
    fn = partial(faulty.crash_once, victim=keys[2], marker=str(tmp_path / "crashed"))
    with dask_client("local", n_workers=2) as client:
        report = run(work, tmp_path / "out", engines_path=tiny_engines, client=client, batch_size=2,
                     show_progress=False, batch_fn=fn)
    assert (tmp_path / "crashed").exists()  # a worker really died
    rows, failures = _tables(tmp_path / "out")
    assert (report.segmented, report.failed, len(rows), len(failures)) == (6, 0, 6, 0)
    _assert_exactly_once(rows, failures, keys)


def test_poison_study_is_recorded_not_retried_forever(work_store, tiny_engines, tmp_path):
    work, keys = work_store
    fn = partial(faulty.crash_on, poison=keys[4])
    with dask_client("local", n_workers=2) as client:
        report = run(work, tmp_path / "out", engines_path=tiny_engines, client=client, batch_size=3,
                     show_progress=False, batch_fn=fn)
    rows, failures = _tables(tmp_path / "out")
    assert (report.segmented, len(rows)) == (5, 5)
    assert [(f["study_key"], f["reason"]) for f in failures] == [(keys[4], "worker_died")]
    _assert_exactly_once(rows, failures, keys)


def test_driver_sigkill_then_rerun_equals_uninterrupted_run(work_store, tiny_engines, tmp_path, store):
    work, keys = work_store
    reference = tmp_path / "ref.zarr"
    shutil.copytree(store, reference)
    run(reference, tmp_path / "ref-out", engines_path=tiny_engines, batch_size=1, show_progress=False)
    expected, _ = _tables(tmp_path / "ref-out")

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "kneebatch.cli", "run", str(work), str(out), "--engines", str(tiny_engines),
           "--workers", "1", "--batch-size", "1", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "parts").glob("part-*[0-9a-f].arrow"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = len(list((out / "parts").glob("part-*[0-9a-f].arrow")))
    assert 2 <= saved < 6, "the kill must land mid-run"
    assert not (out / "measurements.parquet").exists()
    report = run(work, out, engines_path=tiny_engines, batch_size=1, show_progress=False)
    assert report.already_done == saved and report.segmented == 6 - saved
    rows, failures = _tables(out)
    _assert_exactly_once(rows, failures, keys)
    # same numbers as the run that was never interrupted
    got, want = comparable(rows), comparable(expected)
    diff = {(w["study_key"], k): (g[k], w[k]) for g, w in zip(got, want) for k in w if g[k] != w[k]}
    assert not diff, diff
