"""Choosing k per layer: knapsack optimality, Pareto options, back-off, impossible budgets."""

import itertools

import pytest

from hpcq.errors import ConfigError
from hpcq.select import layer_options, pareto_front, select_plan

BASELINE = {"val": {"top1_pct": 90.0}}


def result(layer, k, top1, fp32, bitpacked, agreement=99.0, status="ok"):
    return {"layer": layer, "number": 1, "k": k, "status": status, "val": {"top1_pct": top1},
            "fidelity": {"agreement_pct": agreement}, "layer_fp32_bytes": fp32, "layer_bitpacked_bytes": bitpacked}


RESULTS = [
    result("a", 2, 85.0, 4000, 250), result("a", 8, 89.8, 4000, 750), result("a", 32, 90.0, 4000, 1250),
    result("b", 2, 89.0, 1000, 60), result("b", 8, 89.7, 1000, 190), result("b", 32, 90.1, 1000, 320),
    result("c", 4, 80.0, 500, 60, status="failed"),
]


def brute_force(results, budget):
    options = layer_options(results, BASELINE, "accuracy")
    best = None
    for combo in itertools.product(*options.values()):
        loss = sum(o.loss for o in combo)
        saved = sum(o.saved_bytes for o in combo)
        if loss <= budget + 1e-9 and (best is None or saved > best[0]):
            best = (saved, {o.layer: o.k for o in combo if o.k is not None})
    return best


@pytest.mark.parametrize("budget", [0.0, 0.2, 0.3, 0.5, 1.0, 1.3, 6.0])
def test_choice_is_the_smallest_model_within_the_budget(budget):
    saved, weights = brute_force(RESULTS, budget)
    if not weights:
        with pytest.raises(ConfigError, match="no layer can be quantized"):
            select_plan(RESULTS, BASELINE, metric="accuracy", budget=budget, fp32_bytes=6000,
                        measure_loss=lambda w: 0.0)
        return
    selection = select_plan(RESULTS, BASELINE, metric="accuracy", budget=budget, fp32_bytes=6000,
                            measure_loss=lambda w: 0.0)
    assert selection.choice.weights == weights and selection.choice.saved_bytes == saved
    assert selection.choice.predicted_loss <= budget + 1e-9
    assert "c" not in selection.choice.weights  # failed task never chosen


def test_back_off_when_the_combined_plan_breaks_the_budget():
    measured = []

    def measure(weights):  # interactions: the combination is worse than the sum
        loss = 3.0 * sum({2: 1.0, 8: 0.2, 32: 0.0}[k] for k in weights.values())
        measured.append((dict(weights), loss))
        return loss

    selection = select_plan(RESULTS, BASELINE, metric="accuracy", budget=0.5, fp32_bytes=6000, measure_loss=measure)
    assert selection.measured_loss <= 0.5
    assert len(selection.backoff) >= 1 and selection.backoff[0]["measured_loss"] > 0.5
    assert selection.to_dict()["within_budget"]
    assert measured[-1][0] == selection.choice.weights


def test_budget_nothing_satisfies_after_back_off():
    with pytest.raises(ConfigError, match="back-off"):
        select_plan(RESULTS, BASELINE, metric="accuracy", budget=0.5, fp32_bytes=6000, measure_loss=lambda w: 5.0,
                    max_backoff_steps=3)


def test_fidelity_metric_and_pareto_front():
    selection = select_plan(RESULTS, BASELINE, metric="fidelity", budget=2.0, fp32_bytes=6000,
                            measure_loss=lambda w: 0.0)
    assert selection.choice.weights == {"a": 2, "b": 2}  # every option costs 1 point of agreement
    front = selection.pareto
    sizes = [p["size_bytes"] for p in front]
    losses = [p["predicted_loss"] for p in front]
    assert sizes == sorted(sizes, reverse=True) and losses == sorted(losses)
    assert front[0]["weights"] == {} and front[0]["size_bytes"] == 6000
    assert pareto_front([], 10) == []


def test_accuracy_metric_without_labels_is_a_clear_error():
    unlabelled = [{k: v for k, v in r.items() if k != "val"} for r in RESULTS]
    with pytest.raises(ConfigError, match="select.metric=fidelity"):
        select_plan(unlabelled, BASELINE, metric="accuracy", budget=1, fp32_bytes=6000, measure_loss=lambda w: 0)
