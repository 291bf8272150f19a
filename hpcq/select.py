"""Choosing k per layer from the sweep table.

Each layer's options are "keep float" or one of the swept k, with a predicted loss (validation top-1 drop
in points, or top-1 disagreement with the teacher without labels) and a size. Assuming losses add up, the
smallest model within a budget is a multiple-choice knapsack, solved exactly by dynamic programming over
the budget in small steps. Layer effects interact, so the chosen plan is then measured as a whole; while
it breaks the budget, the budget used for the prediction shrinks and the choice is made again (back-off).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from hpcq.errors import ConfigError

log = logging.getLogger(__name__)

PARETO_SPAN = 4.0  # Pareto options are listed for budgets up to this multiple of the requested one


@dataclass(frozen=True)
class LayerOption:
    """One choice for one layer: k (None = keep float), predicted loss and bytes saved against fp32."""

    layer: str
    k: int | None
    loss: float
    saved_bytes: int


@dataclass(frozen=True)
class Choice:
    """A plan (layer -> k) with its predicted loss and the bytes it saves on the quantized weights."""

    weights: dict[str, int]
    predicted_loss: float
    saved_bytes: int


@dataclass
class Selection:
    """What ``select_plan`` decided and why."""

    metric: str
    budget: float
    choice: Choice
    measured_loss: float
    backoff: list[dict] = field(default_factory=list)
    pareto: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-able dict."""
        out = asdict(self)
        out["within_budget"] = self.measured_loss <= self.budget
        return out


def layer_options(results: Sequence[dict], baseline: dict, metric: str) -> dict[str, list[LayerOption]]:
    """Options per layer from the sweep results (failed tasks are left out)."""
    options: dict[str, list[LayerOption]] = {}
    reference = baseline["val"]["top1_pct"] if metric == "accuracy" else 100.0
    for r in results:
        if r.get("status") != "ok":
            continue
        if metric == "accuracy":
            if "val" not in r:
                raise ConfigError("select.metric is accuracy but the sweep has no labelled validation results; "
                                  "use --set select.metric=fidelity")
            loss = reference - r["val"]["top1_pct"]
        else:
            loss = reference - r["fidelity"]["agreement_pct"]
        layer_list = options.setdefault(r["layer"], [LayerOption(r["layer"], None, 0.0, 0)])
        layer_list.append(LayerOption(r["layer"], r["k"], max(loss, 0.0),
                                      r["layer_fp32_bytes"] - r["layer_bitpacked_bytes"]))
    return options


def _frontier(options: dict[str, list[LayerOption]], max_loss: float) -> list[Choice]:
    """Every non-dominated plan with predicted loss <= ``max_loss``, by increasing loss (exact).

    Layers are merged one at a time; after each merge only plans that save more bytes than every plan of
    lower loss are kept, so the list stays small while the answer stays exact.
    """
    front: list[tuple[float, int, tuple[LayerOption, ...]]] = [(0.0, 0, ())]
    for layer_opts in options.values():
        merged = [
            (loss + opt.loss, saved + opt.saved_bytes, chosen + (opt,))
            for loss, saved, chosen in front
            for opt in layer_opts
            if loss + opt.loss <= max_loss + 1e-12
        ]
        merged.sort(key=lambda item: (item[0], -item[1]))
        front = []
        for item in merged:
            if not front or item[1] > front[-1][1]:
                front.append(item)
    return [Choice({o.layer: o.k for o in chosen if o.k is not None}, loss, saved) for loss, saved, chosen in front]


def _best_within(front: Sequence[Choice], budget: float) -> Choice:
    return [c for c in front if c.predicted_loss <= budget + 1e-12][-1]


def pareto_front(choices: Sequence[Choice], fp32_bytes: int) -> list[dict]:
    """The non-dominated (predicted loss, size) options among the knapsack's choices."""
    front: list[dict] = []
    for choice in sorted(choices, key=lambda c: (c.predicted_loss, -c.saved_bytes)):
        size = fp32_bytes - choice.saved_bytes
        if front and size >= front[-1]["size_bytes"]:
            continue
        front.append({"predicted_loss": round(choice.predicted_loss, 4), "size_bytes": size,
                      "reduction_pct": round(100 * choice.saved_bytes / fp32_bytes, 3), "weights": choice.weights})
    return front


def select_plan(
    results: Sequence[dict],
    baseline: dict,
    *,
    metric: str,
    budget: float,
    fp32_bytes: int,
    measure_loss: Callable[[dict[str, int]], float],
    max_backoff_steps: int = 20,
) -> Selection:
    """The smallest plan within ``budget`` whose measured loss also stays within it.

    ``measure_loss(weights)`` quantizes the model with the plan and returns its real loss (same units as the
    budget). Raises ConfigError when no layer can be quantized within the budget.
    """
    options = layer_options(results, baseline, metric)
    if not options:
        raise ConfigError("the sweep has no successful result to choose from; see the failed tasks in its table")
    front = _frontier(options, max(budget * PARETO_SPAN, 1.0))
    pareto = pareto_front(front, fp32_bytes)
    effective = budget
    backoff: list[dict] = []
    for _ in range(max_backoff_steps + 1):
        choice = _best_within(front, effective)
        if not choice.weights and backoff:
            break
        if not choice.weights:
            cheapest = min((o for opts in options.values() for o in opts if o.k is not None), key=lambda o: o.loss)
            raise ConfigError(
                f"no layer can be quantized within the budget of {budget} ({metric}); the least harmful sweep "
                f"result is {cheapest.layer} at k={cheapest.k} with a predicted loss of {cheapest.loss:.3f}. "
                "Raise select.max_accuracy_drop (or lower select.min_agreement_pct), or sweep larger k."
            )
        measured = measure_loss(choice.weights)
        log.info("plan with %d layers: predicted loss %.3f, measured %.3f (budget %.3f)",
                 len(choice.weights), choice.predicted_loss, measured, budget)
        if measured <= budget:
            return Selection(metric, budget, choice, measured, backoff, pareto)
        backoff.append({"weights": choice.weights, "predicted_loss": choice.predicted_loss, "measured_loss": measured})
        # Predict with a smaller budget, in proportion to how far the combined plan overshot; at least
        # step below this plan so the next one differs.
        effective = min(choice.predicted_loss - 1e-9, effective * budget / measured)
        if effective < 0:
            break
    raise ConfigError(
        f"no plan stays within the budget of {budget} ({metric}) once layer interactions are measured, after "
        f"{len(backoff)} back-off steps; raise the budget or sweep larger k"
    )
