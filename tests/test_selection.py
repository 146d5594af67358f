"""Model selection: the best checkpoint by a validation metric, and early stopping on a plateau."""

import pytest

from common.errors import LmforgeError
from orchestrator.config import load_config
from orchestrator.evaluate import rank_slices
from orchestrator.selection import Selection


def test_the_best_value_is_kept_and_a_plateau_stops_after_patience_evaluations():
    sel = Selection("val/f1", "max", patience=2, min_delta=0.01)
    assert sel.update({"val/f1": 0.50}, 10)
    assert sel.update({"val/f1": 0.60}, 20)
    assert not sel.update({"val/f1": 0.605}, 30)  # within min_delta: no improvement
    assert not sel.should_stop
    assert not sel.update({"val/f1": 0.40}, 40)
    assert sel.should_stop and (sel.best, sel.best_step) == (0.60, 20)
    assert "has not improved for 2 evaluations (best 0.6 at step 20)" in sel.stop_message(40)


def test_lower_is_better_for_losses_and_the_state_survives_a_resume():
    sel = Selection("val/loss", "min", patience=3)
    sel.update({"val/loss": 2.0}, 5)
    sel.update({"val/loss": 2.5}, 10)
    again = Selection("val/loss", "min", patience=3)
    again.load(sel.state())
    assert (again.best, again.best_step, again.bad_evals) == (2.0, 5, 1)
    other = Selection("val/accuracy", "max")
    other.load(sel.state())  # another metric: its own history starts empty
    assert other.best is None


def test_a_metric_the_objective_does_not_report_names_the_ones_it_does():
    with pytest.raises(LmforgeError, match=r"trainer.monitor=val/f1 .* reports val/accuracy, val/loss"):
        Selection("val/f1", "max").update({"val/loss": 1.0, "val/accuracy": 0.5, "train/loss": 1.0}, 1)


def test_the_monitor_defaults_to_the_objective_and_infers_its_direction():
    from model.objectives import get_objective

    cfg = load_config(["objective=clm"])
    assert (Selection.for_run(cfg, get_objective("clm")).metric, Selection.for_run(cfg, get_objective("clm")).mode) \
        == ("val/loss", "min")
    cfg = load_config(["trainer.monitor=val/accuracy"])
    assert Selection.for_run(cfg, get_objective("clm")).mode == "max"


def test_every_validation_sample_is_evaluated_once_by_ranks_running_equal_batch_counts():
    for n, batch, world in ((10, 3, 1), (10, 3, 2), (7, 4, 3), (1, 8, 2), (33, 5, 4)):
        plans = [rank_slices(n, batch, r, world) for r in range(world)]
        assert len({len(p) for p in plans}) == 1  # ZeRO-3 collectives need the same count on every rank
        seen = sorted(i for p in plans for ids in p for i in ids)
        assert seen == list(range(n))
        assert all(len(ids) <= batch for p in plans for ids in p)
