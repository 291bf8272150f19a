"""The run directory: one per run spec; every stage reads and writes its files there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from hpcq.config import RunConfig, config_to_dict, write_resolved_config
from hpcq.errors import ConfigError


@dataclass(frozen=True)
class RunDir:
    """Paths of one run's files."""

    root: Path

    @property
    def config(self) -> Path:
        """The resolved config of the run."""
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        """The layer manifest (JSON)."""
        return self.root / "manifest.json"

    @property
    def quantized(self) -> Path:
        """The compressed model after quantization (before retraining)."""
        return self.root / "quantized.hpcq"

    @property
    def report_json(self) -> Path:
        """The run's report (JSON)."""
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        """The run's report (Markdown)."""
        return self.root / "report.md"


def _flatten(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the dotted keys of a nested config, for naming differences."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def open_run_dir(config: RunConfig) -> RunDir:
    """Create (or reopen) the run directory of ``config``.

    A directory that already holds a run of a different spec is refused, so that results of two specs never
    mix; the message says how to proceed.
    """
    run = RunDir(Path(config.run_dir))
    resolved = config_to_dict(config)
    if run.config.is_file():
        existing = yaml.safe_load(run.config.read_text()) or {}
        # A directory where a first attempt failed before computing anything may take the corrected spec.
        holds_results = any(p.name != run.config.name for p in run.root.iterdir())
        if existing != resolved and holds_results:
            old, new = _flatten(existing), _flatten(resolved)
            changed = sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))
            raise ConfigError(
                f"run directory {run.root} holds a run of a different spec (changed: {', '.join(changed[:8])}); "
                "set run_dir to a new folder (--set run_dir=...) or delete the old one"
            )
    run.root.mkdir(parents=True, exist_ok=True)
    write_resolved_config(config, run.root)
    return run
