"""The per-layer sweep: each selected layer quantized alone at each k, one scheduler task per pair.

A task is a small callable built from a spec (run directory, layer, k); it reads the run's config and the
teacher's source from the run directory, imports torch only when called, and writes its result
atomically to ``sweep/tasks/NNN-LAYER-kK.json``. A task whose result says ``ok`` is never run again; a
failed one is recorded with its error and retried by the next run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from hpcq.config import SweepConfig
from hpcq.fileio import atomic_write_json
from hpcq.manifest import LayerInfo, select_layers, shared_weight_layers

log = logging.getLogger(__name__)

TEACHER_SOURCE_FILE = "teacher_source.json"


@dataclass(frozen=True)
class SweepTaskSpec:
    """One (layer, k) of the sweep."""

    run_dir: str
    layer: str
    number: int
    k: int

    @property
    def result_path(self) -> Path:
        """Where the task writes its result."""
        safe = self.layer.replace("/", "_")
        return Path(self.run_dir) / "sweep" / "tasks" / f"{self.number:03d}-{safe}-k{self.k}.json"


def plan_tasks(run_dir: Path, manifest: Sequence[LayerInfo], config: SweepConfig) -> list[SweepTaskSpec]:
    """All (layer, k) tasks of the sweep; k above a layer's number of weights is left out (it cannot fit),
    and layers sharing one weight tensor (tied weights) are swept once, as the layer that stands for it."""
    stands_for = shared_weight_layers(manifest)
    wanted = {stands_for[row.name] for row in select_layers(manifest, config.layers)}
    rows = [row for row in manifest if row.name in wanted]
    return [
        SweepTaskSpec(str(run_dir), row.name, row.number, k)
        for row in rows
        for k in sorted(set(config.ks))
        if k <= row.weight_count
    ]


def read_result(spec: SweepTaskSpec) -> dict | None:
    """The task's result, or None when it has not run (a damaged file counts as not run)."""
    try:
        return json.loads(spec.result_path.read_text())
    except (OSError, ValueError):
        return None


def is_done(spec: SweepTaskSpec) -> bool:
    """Whether the task has a successful result on disk."""
    result = read_result(spec)
    return bool(result) and result.get("status") == "ok"


def record_failure(spec: SweepTaskSpec, error: str) -> dict:
    """Write a failed result for a task (its error kept for the table and the logs)."""
    result = {**asdict(spec), "status": "failed", "error": error[-2000:]}
    atomic_write_json(spec.result_path, result)
    return result


class SweepTask:
    """The callable a scheduler runs for one (layer, k): quantize that layer alone, measure, write."""

    def __init__(self, spec: SweepTaskSpec) -> None:
        self.spec = spec

    def __call__(self) -> dict:
        try:
            return self._run()
        except Exception as exc:  # a failed task must not stop the others: record it and return
            log.error("sweep task %s k=%d failed: %s", self.spec.layer, self.spec.k, exc)
            return record_failure(self.spec, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")

    def checkpoint(self):
        """Requeue the same task after preemption (submitit calls this on a time-out or preemption)."""
        import submitit

        return submitit.helpers.DelayedSubmission(SweepTask(self.spec))

    def _run(self) -> dict:
        import time

        import torch

        from hpcq.config import load_config
        from hpcq.datasets import unlabelled_eval_batches, validation_batches
        from hpcq.evaluate import accuracy, fidelity
        from hpcq.kmeans import weighted_sse
        from hpcq.models import load_model
        from hpcq.quantize import Plan, quantize_
        from hpcq.sizes import per_tensor_sizes

        start = time.perf_counter()
        run_dir = Path(self.spec.run_dir)
        config = load_config(run_dir / "config.yaml")
        # Tasks share the machine: one thread each avoids the slowdown of oversubscribed OpenMP threads.
        torch.set_num_threads(config.sweep.cpus_per_task)
        source = json.loads((run_dir / TEACHER_SOURCE_FILE).read_text())
        teacher = load_model(source["model_source"])
        student = load_model(source["model_source"])
        quantized = quantize_(student, Plan(weights={self.spec.layer: self.spec.k}), config.kmeans, progress=False)
        (name,) = quantized  # the shared tensor's own name when the layer's weight is tied to another's
        (row,) = per_tensor_sizes(student.state_dict(), quantized, include_unquantized=False)
        result = {**asdict(self.spec), "status": "ok"}
        if source.get("has_labels", True):
            result["val"] = accuracy(student, validation_batches(config, config.sweep.eval_images)).to_dict()
        result["fidelity"] = fidelity(
            student, teacher, unlabelled_eval_batches(config, source["unlabelled_urls"], config.sweep.fidelity_images)
        ).to_dict()
        result["layer_fp32_bytes"] = row.fp32_bytes
        result["layer_bitpacked_bytes"] = row.bitpacked_bytes
        result["layer_entropy_coded_bytes"] = row.entropy_coded_bytes
        qt = quantized[name]
        original = teacher.state_dict()[name].reshape(-1).numpy()
        result["sse"] = weighted_sse(original, None, qt.codebook.numpy(), qt.indices.reshape(-1).numpy())
        result["seconds"] = round(time.perf_counter() - start, 3)
        result["ran_on"] = {"host": socket.gethostname(), "scheduler_job_id": scheduler_job_id()}
        atomic_write_json(self.spec.result_path, result)
        return result


def scheduler_job_id() -> str | None:
    """Id of the batch job this process runs in (Slurm ``ARRAY_INDEX``, PBS ``ID[INDEX].server``, Grid
    Engine ``ID.TASK``); None outside one."""
    env = os.environ
    if "SLURM_JOB_ID" in env:
        array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
        return f"{array}_{task}" if array and task else env["SLURM_JOB_ID"]
    if "PBS_JOBID" in env:
        return env["PBS_JOBID"]
    if "JOB_ID" in env and "SGE_TASK_ID" in env:
        task = env["SGE_TASK_ID"]
        return env["JOB_ID"] if task == "undefined" else f"{env['JOB_ID']}.{task}"
    return None


def collect_results(specs: Sequence[SweepTaskSpec]) -> list[dict]:
    """Results of the given tasks that have run (ok or failed), in task order."""
    return [r for r in (read_result(s) for s in specs) if r is not None]


def format_sweep_table(results: Sequence[dict], baseline: dict, metric: str = "accuracy") -> str:
    """A layer x k table (Markdown) of validation top-1 (or fidelity agreement) per task."""
    key = "val" if metric == "accuracy" else "fidelity"
    field = "top1_pct" if metric == "accuracy" else "agreement_pct"
    ks = sorted({r["k"] for r in results})
    layers = sorted({(r["number"], r["layer"]) for r in results})
    cell = {(r["layer"], r["k"]): r for r in results}
    title = "validation top-1 %" if metric == "accuracy" else "top-1 agreement with the teacher %"
    ref = baseline.get("val", {}).get("top1_pct") if metric == "accuracy" else 100.0
    lines = [f"Sweep: {title} with one layer quantized (teacher: {ref if ref is None else f'{ref:.2f}'})", "",
             "| # | layer | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
    for number, layer in layers:
        cells = []
        for k in ks:
            r = cell.get((layer, k))
            if r is None:
                cells.append("")
            elif r["status"] != "ok":
                cells.append("failed")
            else:
                cells.append(f"{r[key][field]:.2f}" if key in r else "n/a")
        lines.append(f"| {number} | {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
