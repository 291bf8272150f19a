"""The sweep through real submitit executors (debug: in process; local: subprocesses; slurm: a job array
on the single-node Slurm of slurm/start-slurm.sh)."""

import json
import os
import subprocess
import time

import pytest
import torch

from hpcq.config import SweepConfig, load_config
from hpcq.manifest import build_manifest
from hpcq.pipeline import prepare_stage, select_stage, sweep_stage
from hpcq.rundir import open_run_dir
from hpcq.sweep import plan_tasks
from hpcq.zoo import fashion_vgg

from .conftest import SMALL_KWARGS, requires_fashion
from .test_cli import write_spec


def test_plan_tasks_skips_k_above_the_layer_size(tmp_path):
    manifest = build_manifest(fashion_vgg(**SMALL_KWARGS), torch.zeros(1, 1, 28, 28))
    tasks = plan_tasks(tmp_path, manifest, SweepConfig(ks=(1, 64), layers="1,5"))
    # Layer 1 has 36 weights: k=64 cannot fit it.
    assert [(t.number, t.k) for t in tasks] == [(1, 1), (5, 1), (5, 64)]
    assert tasks[0].result_path.parent == tmp_path / "sweep" / "tasks"


def assert_ran_as_one_slurm_array(results):
    """Every result came from an element of one Slurm job array that accounting shows COMPLETED in the
    partition asked for."""
    job_ids = {r["ran_on"]["scheduler_job_id"] for r in results}
    assert all("_" in job_id for job_id in job_ids), job_ids  # ARRAYID_INDEX
    (array,) = {job_id.split("_")[0] for job_id in job_ids}
    for _ in range(60):  # accounting lags the jobs' ends a little: poll
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", array, "-o", "JobID,JobName,Partition,State"],
                             capture_output=True, text=True, check=True).stdout
        rows = {fields[0]: fields[1:] for fields in (line.split("|") for line in out.splitlines())}
        if all(rows.get(job_id, ["", "", ""])[2] == "COMPLETED" for job_id in job_ids):
            break
        time.sleep(1)
    for job_id in job_ids:
        assert rows[job_id] == ["hpcq-sweep", "debug", "COMPLETED"], rows


def three_valued_checkpoint(path):
    """A checkpoint whose first convolution has only 3 distinct weights: k=8 must fail on it."""
    torch.manual_seed(0)
    state = fashion_vgg(**SMALL_KWARGS).state_dict()
    state["features.0.weight"] = torch.tensor([-0.5, 0.0, 0.5])[torch.arange(36) % 3].reshape(4, 1, 3, 3)
    torch.save(state, path)
    return path


@requires_fashion
@pytest.mark.parametrize("executor", ["debug", "local", pytest.param("slurm", marks=pytest.mark.slurm),
                                      pytest.param("sge", marks=pytest.mark.sge)])
def test_sweep_runs_tasks_records_failures_and_skips_done_ones(tmp_path, image_folder, executor, request):
    slurm = {}
    if executor == "slurm":
        request.getfixturevalue("slurm_cluster")
        slurm = {"slurm_partition": "debug", "cpus_per_task": 1, "mem_gb": 1.0}
    if executor == "sge":
        request.getfixturevalue("sge_cluster")
        slurm = {"qsub_queue": "all.q"}
    checkpoint = three_valued_checkpoint(tmp_path / "three.pt")
    spec = write_spec(tmp_path, checkpoint, image_folder,
                      sweep={"executor": executor, "ks": [2, 8], "layers": "1,6", "eval_images": 500,
                             "fidelity_images": 8, "max_parallel": 2, "timeout_min": 5, **slurm},
                      select={"max_accuracy_drop": 100.0})
    config = load_config(spec)
    run = open_run_dir(config)
    prepared = prepare_stage(config, run, progress=False)
    results, baseline = sweep_stage(config, run, prepared, progress=False)
    by_task = {(r["layer"], r["k"]): r for r in results}
    assert set(by_task) == {("features.0", 2), ("features.0", 8), ("classifier.4", 2), ("classifier.4", 8)}
    assert by_task[("features.0", 8)]["status"] == "failed"
    assert "3 distinct values" in by_task[("features.0", 8)]["error"]
    ok = [r for r in results if r["status"] == "ok"]
    assert len(ok) == 3
    for r in ok:
        assert r["val"]["count"] == 500 and r["fidelity"]["count"] == 8
        assert r["layer_bitpacked_bytes"] < r["layer_fp32_bytes"]
    assert "failed" in (run.root / "sweep" / "table.md").read_text()
    assert 0 <= baseline["val"]["top1_pct"] <= 100
    if executor == "slurm":
        assert_ran_as_one_slurm_array(ok)
    if executor == "sge":  # elements of one Grid Engine array job: JOB_ID.TASK
        assert len({r["ran_on"]["scheduler_job_id"].split(".")[0] for r in ok}) == 1
        assert {r["ran_on"]["scheduler_job_id"].split(".")[1] for r in ok} <= {"1", "2", "3", "4"}

    # A second sweep skips the finished tasks and retries only the failed one.
    stamps = {p.name: os.stat(p).st_mtime_ns for p in (run.root / "sweep" / "tasks").glob("*.json")}
    sweep_stage(config, run, prepared, progress=False)
    after = {p.name: os.stat(p).st_mtime_ns for p in (run.root / "sweep" / "tasks").glob("*.json")}
    changed = {name for name in stamps if stamps[name] != after[name]}
    assert changed == {"001-features.0-k8.json"}

    # With an unlimited budget the selection takes the smallest option of every layer that worked.
    plan = select_stage(config, run, prepared, results, baseline)
    assert plan.weights == {"features.0": 2, "classifier.4": 2}
    saved = json.loads((run.root / "selection.json").read_text())
    assert saved["within_budget"] and saved["choice"]["weights"] == plan.weights
