"""The stages of a run, each reading and writing files in the run directory.

Pure compute lives in the other modules; this module knows the run directory's layout and which stage
needs what. Every stage reuses what an earlier run of the same spec already wrote.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpcq.artifact import load_artifact, save_artifact
from hpcq.config import RunConfig, config_to_dict
from hpcq.data.shards import image_folder_samples, read_shard_manifest, shard_urls, write_shards
from hpcq.errors import ConfigError
from hpcq.evaluate import accuracy, fidelity
from hpcq.fileio import atomic_write_json, atomic_write_text
from hpcq.manifest import build_manifest
from hpcq.models import load_model
from hpcq.quantize import Plan, quantize_, resolve_plan
from hpcq.rundir import RunDir, open_run_dir
from hpcq.sizes import model_sizes
from hpcq.teacher import ensure_teacher, fashion_splits

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


def unlabelled_shard_dir(config: RunConfig) -> Path:
    """Where the unlabelled shards live: ``data.shard_dir`` or a cache folder named after their settings."""
    if config.data.shard_dir:
        return Path(config.data.shard_dir)
    name = Path(config.data.unlabelled).name or "images"
    cache = Path(config.teacher.cache_dir).expanduser()
    return cache / "shards" / f"{name}-{config.data.image_size}px-{config.data.channels}ch-{config.data.shard_size}"


def ensure_unlabelled_shards(config: RunConfig) -> list[str]:
    """Write the unlabelled image folder as WebDataset shards (once) and return their paths."""
    out_dir = unlabelled_shard_dir(config)
    d = config.data
    description = {"source": str(Path(d.unlabelled).resolve()), "image_size": d.image_size,
                   "channels": d.channels, "shard_size": d.shard_size}
    if not (out_dir / "manifest.json").is_file():
        samples = image_folder_samples(Path(d.unlabelled), d.image_size, d.channels)
        report = write_shards(samples, out_dir, d.shard_size, description=description)
    else:
        report = read_shard_manifest(out_dir)
    if report.bad:
        log.warning("%d unreadable images were skipped while writing %s (see its manifest.json)", report.bad, out_dir)
    return shard_urls(out_dir)


@dataclass
class QuantizedRun:
    """The models of a run after quantization, and what was written."""

    teacher: nn.Module
    student: nn.Module
    plan: Plan
    quantized: dict


def quantize_stage(config: RunConfig, run: RunDir, source: dict, progress: bool = True) -> QuantizedRun:
    """Load the teacher, write its manifest, apply the spec's plan and write ``quantized.hpcq``.

    A ``quantized.hpcq`` already written for the same plan is loaded instead of fitted again.
    """
    teacher = load_model(source)
    manifest = build_manifest(teacher, example_input(config))
    atomic_write_json(run.manifest, [row.to_dict() for row in manifest])
    plan = resolve_plan(manifest, config.quantize)
    if run.quantized.is_file():
        loaded = load_artifact(run.quantized)
        if loaded.header.get("plan") == plan.to_dict():
            log.info("reusing %s", run.quantized)
            return QuantizedRun(teacher, loaded.model, plan, loaded.quantized)
        log.info("%s was written for another plan; quantizing again", run.quantized)
    student = load_model(source)
    quantized = quantize_(student, plan, config.kmeans, progress=progress)
    save_artifact(run.quantized, student, quantized, model_source=source, plan=plan.to_dict(),
                  extra={"config": config_to_dict(config)})
    return QuantizedRun(teacher, student, plan, quantized)


def evaluate_stage(config: RunConfig, result: QuantizedRun, urls: list[str], progress: bool = True) -> dict:
    """Test accuracy of teacher and quantized student, and their label-free fidelity on unlabelled images."""
    from hpcq.data.loaders import finite_unlabelled_batches

    if config.data.labelled != "fashion-mnist":
        raise ConfigError(f"data.labelled {config.data.labelled!r} is not supported yet; use fashion-mnist")
    splits = fashion_splits(config.data, config.teacher, config.seed)
    unlabelled = finite_unlabelled_batches(urls, batch_size=config.data.eval_batch_size, mean=config.data.mean,
                                           std=config.data.std)
    return {
        "teacher": accuracy(result.teacher, splits.test, progress=progress, desc="teacher test").to_dict(),
        "quantized": accuracy(result.student, splits.test, progress=progress, desc="quantized test").to_dict(),
        "fidelity_quantized": fidelity(result.student, result.teacher, unlabelled, progress=progress).to_dict(),
    }


def format_table(report: dict) -> str:
    """The run's result table (Markdown)."""
    acc = report["accuracy"]
    size = report["size"]
    rows = [
        "| model | top-1 % | top-5 % | size (bit-packed) | reduction % (bit-packed / entropy-coded) |",
        "|---|---|---|---|---|",
        f"| teacher (fp32) | {acc['teacher']:.2f} | {report['evaluation']['teacher']['top5_pct']:.2f} | "
        f"{size['fp32_bytes']:,} B | 0 / 0 |",
        f"| quantized | {acc['quantized']:.2f} | {report['evaluation']['quantized']['top5_pct']:.2f} | "
        f"{size['bitpacked_bytes']:,} B | {size['reduction_bitpacked_pct']:.2f} / {size['reduction_entropy_pct']:.2f} |",
    ]
    fid = report["evaluation"]["fidelity_quantized"]
    rows.append("")
    rows.append(f"Label-free fidelity of the quantized model to the teacher on {fid['count']:,} unlabelled images: "
                f"top-1 agreement {fid['agreement_pct']:.2f}%, KL {fid['kl']:.4f} nats.")
    return "\n".join(rows)


def run_all(config: RunConfig, progress: bool = True) -> dict:
    """The main job: teacher, unlabelled shards, quantization, evaluation, artifact, report."""
    run = open_run_dir(config)
    source = model_source(config, progress)
    urls = ensure_unlabelled_shards(config)
    result = quantize_stage(config, run, source, progress)
    evaluation = evaluate_stage(config, result, urls, progress)
    sizes = model_sizes(result.teacher.state_dict(), result.quantized)
    report = {
        "seed": config.seed,
        "note": "single seed; accuracies are top-1 % on the Fashion-MNIST test set",
        "plan": result.plan.to_dict(),
        "accuracy": {"teacher": evaluation["teacher"]["top1_pct"], "quantized": evaluation["quantized"]["top1_pct"]},
        "size": sizes.to_dict(),
        "evaluation": evaluation,
        "artifact": str(run.quantized),
    }
    atomic_write_json(run.report_json, report)
    atomic_write_text(run.report_md, "# hpcq run report\n\n" + format_table(report) + "\n")
    return report
