"""The ``hpcq`` command: thin subcommands over the pipeline's stages.

Exit status: 0 on success, 2 for usage, config and input errors (the message says what to fix), 1 for
anything unexpected.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from hpcq.errors import ConfigError, HpcqError

log = logging.getLogger("hpcq")

USAGE_ERROR = 2


def _add_spec_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("spec", type=Path, nargs=None if required else "?", help="run spec (YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a spec value (repeatable), e.g. --set quantize.weights='{fc: 16}'")


def _load(args: argparse.Namespace):
    from hpcq.config import load_config

    return load_config(args.spec, args.overrides)


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape {text!r} must look like 3,224,224") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"input shape {text!r} must have positive sizes")
    return shape


def cmd_layers(args: argparse.Namespace) -> int:
    """Print the layer manifest of a model."""
    import torch

    from hpcq.manifest import build_manifest, format_manifest, select_layers
    from hpcq.models import load_model, parse_model_source

    source = parse_model_source(args.model)
    if args.pretrained is False and source["kind"] == "torchvision":
        source["weights"] = None
    model = load_model(source)
    shape = args.input_shape or ((3, 224, 224) if source["kind"] == "torchvision" else None)
    manifest = build_manifest(model, torch.zeros(1, *shape) if shape else None)
    if args.select:
        manifest = select_layers(manifest, args.select)
    if args.json:
        sys.stdout.write(json.dumps([row.to_dict() for row in manifest], indent=2) + "\n")
    else:
        sys.stdout.write(format_manifest(manifest) + "\n")
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    """Write WebDataset shards from Fashion-MNIST or an image folder."""
    from hpcq.data.images import OPENCLIPART_ROOT
    from hpcq.data.shards import fashion_mnist_samples, image_folder_samples, write_shards

    if args.source in ("fashion-mnist-train", "fashion-mnist-test"):
        split = args.source.rsplit("-", 1)[1]
        samples = fashion_mnist_samples(split)
        description = {"source": args.source, "image_size": 28, "channels": 1, "shard_size": args.shard_size}
    else:
        root = OPENCLIPART_ROOT if args.source == "openclipart" else Path(args.source)
        samples = image_folder_samples(root, args.image_size, args.channels)
        description = {"source": str(root.resolve()), "image_size": args.image_size, "channels": args.channels,
                       "shard_size": args.shard_size}
    report = write_shards(samples, args.out, args.shard_size, description=description)
    sys.stdout.write(f"{report.written} images in {len(report.shards)} shards at {report.out_dir}; "
                     f"{report.bad} unreadable images skipped{' (reused)' if report.reused else ''}\n")
    return 0


def cmd_teacher(args: argparse.Namespace) -> int:
    """Train (once) and cache the quickstart teacher."""
    from hpcq.teacher import ensure_teacher

    config = _load(args)
    source = ensure_teacher(config.teacher, config.data, config.seed)
    sys.stdout.write(f"{source['checkpoint']}\n")
    return 0


def _prepared(args: argparse.Namespace):
    from hpcq.pipeline import prepare_stage
    from hpcq.rundir import open_run_dir

    config = _load(args)
    run = open_run_dir(config)
    return config, run, prepare_stage(config, run)


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run the per-layer sweep (tasks already done are skipped) and print its table."""
    from hpcq.pipeline import sweep_stage
    from hpcq.sweep import format_sweep_table

    config, run, prepared = _prepared(args)
    results, baseline = sweep_stage(config, run, prepared)
    sys.stdout.write(format_sweep_table(results, baseline, config.select.metric) + "\n")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    """Choose k per layer from the sweep, verify the combined plan, print it."""
    from hpcq.pipeline import choose_plan

    config, run, prepared = _prepared(args)
    plan = choose_plan(config, run, prepared)
    sys.stdout.write(json.dumps(plan.to_dict(), indent=2) + "\n")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize with the chosen plan and write RUN_DIR/quantized.hpcq."""
    from hpcq.pipeline import choose_plan, quantize_stage
    from hpcq.sizes import model_sizes

    config, run, prepared = _prepared(args)
    result = quantize_stage(config, run, prepared, choose_plan(config, run, prepared))
    sizes = model_sizes(result.teacher.state_dict(), result.quantized)
    sys.stdout.write(json.dumps({"artifact": str(run.quantized), "plan": result.plan.to_dict(),
                                 "size": sizes.to_dict()}, indent=2) + "\n")
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    """Retrain the quantized model: label-free (default) or with labels (--labelled, the baseline)."""
    from hpcq.retrain_job import run_retrain
    from hpcq.rundir import open_run_dir

    config = _load(args)
    run = open_run_dir(config)
    if not run.quantized.is_file():
        raise ConfigError(f"{run.quantized} does not exist: run `hpcq quantize` with this spec first")
    summary = run_retrain(config, run.root, labelled=args.labelled)
    sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Evaluate every model of the run on the test set and write the report."""
    from hpcq.report import build_report, format_table

    config, run, prepared = _prepared(args)
    sys.stdout.write(format_table(build_report(config, run, prepared)) + "\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write the run's compressed model (the label-free retrained one when it exists) to a file."""
    from hpcq.artifact import load_artifact, save_artifact
    from hpcq.rundir import open_run_dir

    config = _load(args)
    run = open_run_dir(config)
    candidates = [run.root / "label_free.hpcq", run.quantized]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ConfigError(f"{config.run_dir} holds no compressed model yet: run `hpcq quantize` (or `hpcq run`) first")
    loaded = load_artifact(path)
    sizes = save_artifact(args.out, loaded.model, loaded.quantized, model_source=loaded.header["model_source"],
                          plan=loaded.header.get("plan"), extra=loaded.header.get("extra"))
    sys.stdout.write(f"wrote {args.out} from {path.name} ({args.out.stat().st_size:,} bytes; "
                     f"{sizes.reduction_bitpacked_pct:.2f}% smaller than fp32)\n")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Top-1/top-5 of a model or artifact on the spec's labelled test set (Fashion-MNIST or image folder)."""
    from hpcq.datasets import test_batches
    from hpcq.evaluate import accuracy
    from hpcq.models import load_model, parse_model_source

    config = _load(args)
    model = load_model(parse_model_source(args.model))
    sys.stdout.write(json.dumps(accuracy(model, test_batches(config), progress=True).to_dict(), indent=2) + "\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The whole pipeline on a run spec."""
    from hpcq.pipeline import run_all
    from hpcq.report import format_table

    report = run_all(_load(args))
    sys.stdout.write(format_table(report) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``hpcq`` command."""
    parser = argparse.ArgumentParser(prog="hpcq", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("layers", help="list a model's numbered layers (the manifest)")
    p.add_argument("model", help="torchvision name (vgg16, resnet50@IMAGENET1K_V1), pkg.mod:factory[=ckpt.pt], "
                                 "or file.hpcq")
    p.add_argument("--input-shape", type=_parse_shape, help="C,H,W of one input (default 3,224,224 for torchvision)")
    p.add_argument("--select", action="append", help="only layers matching these selectors (14-15, fc, names, globs)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False,
                   help="load pretrained torchvision weights (not needed to list layers)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("shards", help="write WebDataset shards from Fashion-MNIST or an image folder")
    p.add_argument("--source", required=True,
                   help="fashion-mnist-train, fashion-mnist-test, openclipart, or an image folder")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--shard-size", type=int, default=500, help="images per shard")
    p.add_argument("--image-size", type=int, default=28, help="square side in pixels (image folders)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1, help="1 gray, 3 RGB (image folders)")
    p.set_defaults(func=cmd_shards)

    for name, func, text in (
        ("run", cmd_run, "the whole pipeline on a run spec (the main job)"),
        ("teacher", cmd_teacher, "train and cache the quickstart teacher"),
        ("sweep", cmd_sweep, "quantize each layer alone at each k, one scheduler task per pair"),
        ("select", cmd_select, "choose k per layer from the sweep and verify the combined plan"),
        ("quantize", cmd_quantize, "apply the chosen plan; writes RUN_DIR/quantized.hpcq"),
        ("retrain", cmd_retrain, "retrain the quantized model without labels (or --labelled)"),
        ("report", cmd_report, "evaluate all models of the run and write report.json / report.md"),
    ):
        p = sub.add_parser(name, help=text)
        _add_spec_args(p, required=name == "run")
        if name == "retrain":
            p.add_argument("--labelled", action="store_true", help="the conventional baseline with labels")
        p.set_defaults(func=func)

    p = sub.add_parser("export", help="write the compressed model (.hpcq) to a file")
    _add_spec_args(p)
    p.add_argument("--out", type=Path, required=True, help="output file (.hpcq)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="accuracy of a model or .hpcq file on the spec's labelled test set")
    p.add_argument("model", help="as for `hpcq layers`")
    _add_spec_args(p)
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hpcq`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except HpcqError as exc:
        log.error("%s", exc)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
