"""The stages of a run, each reading and writing files in the run directory.

Pure compute lives in the other modules; this module knows the run directory's layout and which stage
needs what. Every stage reuses what an earlier run of the same spec already wrote, so a killed run that is
started again resumes where it stopped and reaches the same plan.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hpcq.artifact import load_artifact, save_artifact
from hpcq.config import RunConfig, config_to_dict
from hpcq.datasets import (  # noqa: F401 - ensure_unlabelled_shards is part of this module's API
    check_labelled_folders,
    ensure_unlabelled_shards,
    has_labels,
    unlabelled_shard_dir,
    validation_batches,
)
from hpcq.errors import ConfigError, HpcqError
from hpcq.evaluate import accuracy
from hpcq.fileio import atomic_write_json, atomic_write_text
from hpcq.manifest import LayerInfo, build_manifest
from hpcq.models import load_model
from hpcq.quantize import Plan, quantize_, resolve_plan
from hpcq.rundir import RunDir, open_run_dir
from hpcq.sweep import (
    TEACHER_SOURCE_FILE,
    SweepTask,
    collect_results,
    format_sweep_table,
    is_done,
    plan_tasks,
    record_failure,
)
from hpcq.teacher import ensure_teacher

log = logging.getLogger(__name__)


def model_source(config: RunConfig, progress: bool = True) -> dict[str, Any]:
    """The teacher's model source; for ``model.kind: quickstart`` the teacher is trained first if needed."""
    m = config.model
    if m.kind == "quickstart":
        return ensure_teacher(config.teacher, config.data, config.seed, progress=progress)
    if m.kind == "torchvision":
        return {"kind": "torchvision", "name": m.name, "weights": m.weights}
    if m.kind == "factory":
        return {"kind": "factory", "factory": m.factory, "kwargs": dict(m.kwargs), "checkpoint": m.checkpoint}
    return {"kind": "artifact", "path": m.path}


def example_input(config: RunConfig) -> torch.Tensor:
    """A zero batch of one image of the model's input shape, for tracing the forward order."""
    return torch.zeros(1, *config.model.input_shape)


@dataclass
class Prepared:
    """What every later stage needs: the teacher, its source and manifest, and the unlabelled shards."""

    source: dict
    teacher: nn.Module
    manifest: list[LayerInfo]
    unlabelled_urls: list[str]


def prepare_stage(config: RunConfig, run: RunDir, progress: bool = True) -> Prepared:
    """Teacher (trained once for the quickstart), unlabelled shards (written once) and the layer manifest."""
    source = model_source(config, progress)
    urls = ensure_unlabelled_shards(config)
    teacher = load_model(source)
    _check_teacher_fits_data(teacher, config)
    manifest = build_manifest(teacher, example_input(config))
    digest = _checkpoint_digest(source)
    source_file = run.root / TEACHER_SOURCE_FILE
    if source_file.is_file():
        previous = json.loads(source_file.read_text()).get("checkpoint_sha256")
        if previous != digest:
            raise ConfigError(
                f"the teacher's checkpoint {source.get('checkpoint')} changed since {run.root} was computed from it; "
                "its sweep, plan and models belong to the old weights: use a new run_dir (--set run_dir=...)"
            )
    atomic_write_json(run.manifest, [row.to_dict() for row in manifest])
    atomic_write_json(source_file, {"model_source": source, "unlabelled_urls": urls, "has_labels": has_labels(config),
                                    "checkpoint_sha256": digest})
    return Prepared(source, teacher, manifest, urls)


def _checkpoint_digest(source: dict) -> str | None:
    """SHA-256 of the teacher's checkpoint file (None when the source has none)."""
    import hashlib

    checkpoint = source.get("checkpoint") or source.get("path")
    if not checkpoint:
        return None
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_teacher_fits_data(teacher: nn.Module, config: RunConfig) -> None:
    shape = (1, config.data.channels, config.data.image_size, config.data.image_size)
    try:
        with torch.no_grad():
            outputs = teacher.eval()(torch.zeros(shape))
    except RuntimeError as exc:
        raise ConfigError(
            f"the model does not accept the data's images of shape {shape[1:]} (data.channels, data.image_size): "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    check_labelled_folders(config, int(outputs.shape[-1]))


def sweep_stage(config: RunConfig, run: RunDir, prepared: Prepared, progress: bool = True) -> tuple[list[dict], dict]:
    """Run every (layer, k) task not done yet through the configured executor; return results and baseline."""
    from hpcq.launch import make_executor, run_callables
    from hpcq.qsub import DIALECTS as QSUB_DIALECTS
    from hpcq.qsub import run_array

    sweep_dir = run.root / "sweep"
    baseline_path = sweep_dir / "baseline.json"
    if baseline_path.is_file():
        baseline = json.loads(baseline_path.read_text())
    else:
        baseline = {}
        if has_labels(config):
            baseline["val"] = accuracy(prepared.teacher, validation_batches(config, config.sweep.eval_images)).to_dict()
        atomic_write_json(baseline_path, baseline)
    specs = plan_tasks(run.root, prepared.manifest, config.sweep)
    todo = [s for s in specs if not is_done(s)]
    log.info("sweep: %d tasks, %d already done, %d to run on the %s executor", len(specs), len(specs) - len(todo),
             len(todo), config.sweep.executor)
    if todo and config.sweep.executor in QSUB_DIALECTS:
        run_array(config.sweep, todo, sweep_dir / "qsub", progress)
    elif todo:
        executor = make_executor(config.sweep, sweep_dir / "logs")
        run_callables(executor, [SweepTask(s) for s in todo], config.sweep.max_parallel,
                      on_error=lambda i, exc: record_failure(todo[i], f"{type(exc).__name__}: {exc}"),
                      desc="sweep", progress=progress)
    results = collect_results(specs)
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        log.warning("%d sweep tasks failed (they are retried by the next run): %s", len(failed),
                    ", ".join(f"{r['layer']} k={r['k']}" for r in failed[:5]))
    atomic_write_text(sweep_dir / "table.md", format_sweep_table(results, baseline, config.select.metric) + "\n")
    return results, baseline


def quantized_copy(source: dict, plan: Plan, config: RunConfig) -> tuple[nn.Module, dict]:
    """A fresh copy of the teacher quantized with ``plan``, and its quantized tensors."""
    student = load_model(source)
    return student, quantize_(student, plan, config.kmeans, progress=False)


def select_stage(config: RunConfig, run: RunDir, prepared: Prepared, results: list[dict], baseline: dict) -> Plan:
    """Choose k per layer from the sweep (auto) and verify the combined plan; biases follow the spec."""
    from hpcq.evaluate import fidelity
    from hpcq.select import select_plan
    from hpcq.sizes import model_sizes

    biases = resolve_plan(prepared.manifest, config.quantize).biases
    path = run.root / "selection.json"
    # The selection is reused only for the same sweep results: a retried task that now succeeds, or one that
    # now fails, makes it choose again.
    basis = sorted(f"{r['layer']}:{r['k']}:{r['status']}" for r in results)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("basis") == basis:
            return Plan(weights=saved["choice"]["weights"], biases=biases)
        log.info("the sweep results changed since %s was written; selecting again", path)
    sel = config.select
    budget = sel.max_accuracy_drop if sel.metric == "accuracy" else 100.0 - sel.min_agreement_pct
    val = validation_batches(config, config.sweep.eval_images) if sel.metric == "accuracy" else None

    def measure_loss(weights: dict[str, int]) -> float:
        student, _ = quantized_copy(prepared.source, Plan(weights=weights, biases=biases), config)
        if sel.metric == "accuracy":
            return baseline["val"]["top1_pct"] - accuracy(student, val).top1_pct
        from hpcq.datasets import unlabelled_eval_batches

        batches = unlabelled_eval_batches(config, prepared.unlabelled_urls, config.sweep.fidelity_images)
        return 100.0 - fidelity(student, prepared.teacher, batches).agreement_pct

    fp32_bytes = model_sizes(prepared.teacher.state_dict(), {}).fp32_bytes
    bias_loss = measure_loss({}) if biases else 0.0
    if bias_loss > budget:
        raise ConfigError(
            f"quantizing only the biases (quantize.biases = {config.quantize.biases}) already costs {bias_loss:.2f} "
            f"points ({sel.metric}), more than the budget of {budget}; keep more biases in float, e.g. "
            "--set quantize.biases='{fc: 1}' (biases that feed BatchNorm are the sensitive ones)"
        )
    selection = select_plan(results, baseline, metric=sel.metric, budget=budget, fp32_bytes=fp32_bytes,
                            measure_loss=measure_loss, max_backoff_steps=sel.max_backoff_steps)
    atomic_write_json(path, {**selection.to_dict(), "basis": basis, "bias_only_loss": bias_loss})
    return Plan(weights=selection.choice.weights, biases=biases)


@dataclass
class QuantizedRun:
    """The models of a run after quantization."""

    teacher: nn.Module
    student: nn.Module
    plan: Plan
    quantized: dict


def quantize_stage(config: RunConfig, run: RunDir, prepared: Prepared, plan: Plan,
                   progress: bool = True) -> QuantizedRun:
    """Apply ``plan`` and write ``quantized.hpcq``; one already written for the same plan is reused."""
    if run.quantized.is_file():
        loaded = load_artifact(run.quantized)
        if loaded.header.get("plan") == plan.to_dict():
            log.info("reusing %s", run.quantized)
            return QuantizedRun(prepared.teacher, loaded.model, plan, loaded.quantized)
        log.info("%s was written for another plan; quantizing again", run.quantized)
    discard_retraining(run)
    student = load_model(prepared.source)
    quantized = quantize_(student, plan, config.kmeans, progress=progress)
    save_artifact(run.quantized, student, quantized, model_source=prepared.source, plan=plan.to_dict(),
                  extra={"config": config_to_dict(config)})
    return QuantizedRun(prepared.teacher, student, plan, quantized)


def discard_retraining(run: RunDir) -> None:
    """Remove retrained models, their summaries and checkpoints: they belong to a previous quantization."""
    import shutil

    for mode in ("label_free", "labelled"):
        for path in (run.root / f"{mode}.hpcq", run.root / f"retrain-{mode}.json"):
            if path.exists():
                log.info("removing %s (made from an earlier quantized model)", path)
                path.unlink()
    shutil.rmtree(run.root / "checkpoints", ignore_errors=True)


def choose_plan(config: RunConfig, run: RunDir, prepared: Prepared, progress: bool = True) -> Plan:
    """The plan of this run: swept and selected (``select.plan: auto``) or as written in the spec."""
    if config.select.plan == "spec":
        return resolve_plan(prepared.manifest, config.quantize)
    results, baseline = sweep_stage(config, run, prepared, progress)
    return select_stage(config, run, prepared, results, baseline)


def run_all(config: RunConfig, progress: bool = True) -> dict:
    """The main job: prepare, sweep, select, quantize, retrain (label-free and labelled), evaluate, report."""
    from hpcq.report import build_report
    from hpcq.retrain_job import run_retrain

    run = open_run_dir(config)
    prepared = prepare_stage(config, run, progress)
    plan = choose_plan(config, run, prepared, progress)
    quantize_stage(config, run, prepared, plan, progress)
    for labelled in (False, True) if config.retrain.labelled_baseline else (False,):
        if config.retrain.nproc_per_node > 1:
            retrain_with_torchrun(run, labelled, config.retrain.nproc_per_node)
        else:
            run_retrain(config, run.root, labelled=labelled, progress=progress)
    return build_report(config, run, prepared, progress)


def retrain_with_torchrun(run: RunDir, labelled: bool, nproc_per_node: int) -> None:
    """Retrain as ``nproc_per_node`` DDP processes on this node (torchrun, standalone rendezvous)."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
               "-m", "hpcq.retrain_job", str(run.config), "--no-progress"] + (["--labelled"] if labelled else [])
    log.info("retraining with %d processes: %s", nproc_per_node, " ".join(command))
    completed = subprocess.run(command, check=False)
    if completed.returncode != 0:
        raise HpcqError(f"distributed retraining failed (exit status {completed.returncode}); its log is above. "
                        "Run it again to resume from the last checkpoint.")
