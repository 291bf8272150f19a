"""The run's report: accuracy and size of every model, the plan, the targets met or missed, and plots."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

from hpcq.artifact import load_artifact
from hpcq.config import RunConfig
from hpcq.datasets import has_labels, test_batches, unlabelled_eval_batches
from hpcq.errors import ConfigError
from hpcq.evaluate import accuracy, fidelity
from hpcq.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from hpcq.rundir import RunDir
from hpcq.sizes import model_sizes

log = logging.getLogger(__name__)

# Targets of the quickstart (issue 3), after label-free retraining.
TARGET_REDUCTION_PCT = 81.0
TARGET_MAX_DROP_POINTS = 0.5
TARGET_MAX_GAP_TO_LABELLED_POINTS = 0.5

MODELS = (("quantized", "quantized.hpcq"), ("label_free", "label_free.hpcq"), ("labelled", "labelled.hpcq"))


def _skipped(test: Any) -> str:
    bad = getattr(test, "bad_images", 0)
    return f"; {bad:,} undecodable images skipped" if bad else ""


def _test_set_name(config: RunConfig) -> str:
    if config.data.labelled == "imagefolder":
        return f"the labelled test folder {config.data.labelled_test}"
    return "the Fashion-MNIST test set"


def _targets(acc: dict[str, float], size: dict, label_free_labels_used: int | None) -> list[dict]:
    targets = [
        {"name": "bit-packed size reduction >= 81%", "value": round(size["reduction_bitpacked_pct"], 2),
         "met": size["reduction_bitpacked_pct"] >= TARGET_REDUCTION_PCT},
    ]
    if "label_free" in acc:
        drop = acc["teacher"] - acc["label_free"]
        targets.append({"name": "top-1 drop after label-free retraining <= 0.5 points", "value": round(drop, 2),
                        "met": drop <= TARGET_MAX_DROP_POINTS})
    if "label_free" in acc and "labelled" in acc:
        gap = abs(acc["labelled"] - acc["label_free"])
        targets.append({"name": "label-free within 0.5 points of labelled retraining", "value": round(gap, 2),
                        "met": gap <= TARGET_MAX_GAP_TO_LABELLED_POINTS})
    if label_free_labels_used is not None:
        targets.append({"name": "label-free retraining used no labelled image", "value": label_free_labels_used,
                        "met": label_free_labels_used == 0})
    return targets


def build_report(config: RunConfig, run: RunDir, prepared: Any, progress: bool = True) -> dict:
    """Evaluate every model of the run on the test set and write report.json, report.md and the plots."""
    if not run.quantized.is_file():
        raise ConfigError(f"{run.quantized} does not exist: run `hpcq quantize` (or `hpcq run`) with this spec first")
    test = test_batches(config) if has_labels(config) else None
    unlabelled = unlabelled_eval_batches(config, prepared.unlabelled_urls, purpose="report")

    def test_accuracy(model, name: str) -> dict:
        return {} if test is None else {"test": accuracy(model, test, progress=progress, desc=name).to_dict()}

    evaluation = {"teacher": test_accuracy(prepared.teacher, "teacher")}
    quantized = None
    for name, filename in MODELS:
        path = run.root / filename
        if not path.is_file():
            continue
        loaded = load_artifact(path)
        if name == "quantized":
            quantized = loaded
        evaluation[name] = {**test_accuracy(loaded.model, name),
                            "fidelity": fidelity(loaded.model, prepared.teacher, unlabelled).to_dict()}
    size = model_sizes(prepared.teacher.state_dict(), quantized.quantized).to_dict()
    acc = {name: e["test"]["top1_pct"] for name, e in evaluation.items() if "test" in e}
    retrain = {}
    for mode in ("label_free", "labelled"):
        path = run.root / f"retrain-{mode}.json"
        if path.is_file():
            retrain[mode] = json.loads(path.read_text())
    labels_used = retrain.get("label_free", {}).get("labelled_images_used")
    selection_path = run.root / "selection.json"
    report = {
        "seed": config.seed,
        "note": f"single seed, one run; accuracies are top-1 % on {_test_set_name(config)} "
        f"({evaluation['teacher']['test']['count']:,} images{_skipped(test)})"
        if test is not None else "single seed, one run; no labelled data (data.labelled: none): fidelity only",
        "accuracy": acc,
        "size": size,
        "plan": quantized.header["plan"],
        "selection": json.loads(selection_path.read_text()) if selection_path.is_file() else None,
        "evaluation": evaluation,
        "retrain": retrain,
        "targets": _targets(acc, size, labels_used),
    }
    atomic_write_json(run.report_json, report)
    plots = write_plots(run)
    atomic_write_text(run.report_md, format_report(report, plots))
    return report


def format_table(report: dict) -> str:
    """The result table (Markdown): top-1, top-5 and size of every model of the run."""
    size = report["size"]
    names = {"teacher": "original (teacher, fp32)", "quantized": "quantized, not retrained",
             "label_free": "quantized + label-free retraining", "labelled": "quantized + labelled retraining"}
    lines = ["| model | top-1 % | top-5 % | fidelity (agreement %) | size bytes (bit-packed) | reduction % |",
             "|---|---|---|---|---|---|"]
    for name, e in report["evaluation"].items():
        fid = e.get("fidelity", {}).get("agreement_pct")
        compressed = name != "teacher"
        top1, top5 = (f"{e['test']['top1_pct']:.2f}", f"{e['test']['top5_pct']:.2f}") if "test" in e else ("n/a", "n/a")
        lines.append(
            f"| {names.get(name, name)} | {top1} | {top5} | "
            f"{'100.00' if fid is None else f'{fid:.2f}'} | "
            f"{size['bitpacked_bytes'] if compressed else size['fp32_bytes']:,} | "
            f"{size['reduction_bitpacked_pct'] if compressed else 0.0:.2f} |"
        )
    lines.append("")
    lines.append(f"Entropy-coded size: {size['entropy_coded_bytes']:,} bytes "
                 f"({size['reduction_entropy_pct']:.2f}% smaller than fp32). {report['note']}; seed {report['seed']}.")
    lines.append("")
    lines.append("Targets:")
    for t in report["targets"]:
        lines.append(f"- {'MET' if t['met'] else 'MISSED'}: {t['name']} (value: {t['value']})")
    return "\n".join(lines)


def format_report(report: dict, plots: list[Path]) -> str:
    """The whole Markdown report."""
    parts = ["# hpcq run report", "", format_table(report), "", "## Plan", "",
             "```json", json.dumps(report["plan"], indent=1), "```"]
    sel = report.get("selection")
    if sel:
        parts += ["", f"Selected by the sweep: metric {sel['metric']}, budget {sel['budget']}, predicted loss "
                      f"{sel['choice']['predicted_loss']:.3f}, measured {sel['measured_loss']:.3f}, "
                      f"{len(sel['backoff'])} back-off steps.", "", "Pareto options (predicted):", "",
                  "| predicted loss | size bytes | reduction % | layers |", "|---|---|---|---|"]
        parts += [f"| {p['predicted_loss']:.3f} | {p['size_bytes']:,} | {p['reduction_pct']:.2f} | "
                  f"{', '.join(f'{k}={v}' for k, v in p['weights'].items())} |" for p in sel["pareto"]]
    parts += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(parts) + "\n"


def write_plots(run: RunDir) -> list[Path]:
    """Per-layer accuracy vs number of centroids (the paper's figures) and size vs loss of the options."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    tasks = sorted((run.root / "sweep" / "tasks").glob("*.json"))
    results = [json.loads(p.read_text()) for p in tasks]
    results = [r for r in results if r.get("status") == "ok"]
    if results:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        metric = "val" if "val" in results[0] else "fidelity"
        field = "top1_pct" if metric == "val" else "agreement_pct"
        for number, layer in sorted({(r["number"], r["layer"]) for r in results}):
            rows = sorted((r for r in results if r["layer"] == layer), key=lambda r: r["k"])
            ax.plot([r["k"] for r in rows], [r[metric][field] for r in rows], marker="o", label=f"{number}: {layer}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("number of centroids k")
        ax.set_ylabel("validation top-1 %" if metric == "val" else "agreement with teacher %")
        ax.set_title("One layer quantized at a time")
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
        written.append(_save(fig, run.root / "sweep_accuracy.png"))
    sel_path = run.root / "selection.json"
    if sel_path.is_file():
        sel = json.loads(sel_path.read_text())
        fig, ax = plt.subplots(figsize=(6, 4))
        pareto = sel["pareto"]
        ax.step([p["size_bytes"] / 1e6 for p in pareto], [p["predicted_loss"] for p in pareto], where="post",
                marker=".", label="Pareto options (predicted)")
        ax.axhline(sel["budget"], color="gray", linestyle="--", label="budget")
        ax.set_xlabel("model size, MB (bit-packed weights)")
        ax.set_ylabel(f"predicted loss ({sel['metric']}, points)")
        ax.set_title(f"Size vs loss; chosen plan measured at {sel['measured_loss']:.2f}")
        ax.legend()
        ax.grid(True, alpha=0.3)
        written.append(_save(fig, run.root / "pareto.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path
