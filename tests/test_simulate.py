"""The simulated-time scheduler benchmark (benchmarks/simulate.py) on a small synthetic curve
set: the clock, the compute accounting and the schedulers' decisions."""

from __future__ import annotations

import importlib.util
import itertools
import math
import random
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sim() -> Any:
    spec = importlib.util.spec_from_file_location("simulate", ROOT / "benchmarks" / "simulate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["simulate"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run(sim: Any, name: str, workers: int = 4, budget: float = 6.0, seed: int = 0) -> tuple:
    curves = sim.synthetic(40, epochs=9, seed=1)
    scheduler = sim.SCHEDULERS[name](sim.TrialSource(40, random.Random(seed)), 9, 3)
    budget_s = budget * curves.mean_trial_s
    return curves, scheduler, sim.simulate(curves, scheduler, workers, budget_s), budget_s


@pytest.mark.parametrize("name", ["random", "sha", "asha", "asha-promo"])
def test_workers_run_one_job_at_a_time_and_compute_adds_up(sim: Any, name: str) -> None:
    curves, _, out, budget_s = run(sim, name)
    by_worker: dict[int, list] = {}
    for worker, start, end, job in out.spans:
        by_worker.setdefault(worker, []).append((start, end, job))
    assert sorted(by_worker) == [0, 1, 2, 3]
    for spans in by_worker.values():
        spans.sort(key=lambda s: (s[0], s[1]))
        for (_, end, _), (start, _, _) in itertools.pairwise(spans):
            assert start >= end - 1e-9  # never two jobs on one worker at once
    # each job's span is exactly its epochs' seconds, unless the budget cut it
    epochs_of: dict[tuple, list[int]] = {}
    for r in out.results:
        epochs_of.setdefault((r.worker, r.trial), []).append(r.epoch)
    total = 0.0
    for worker, start, end, job in out.spans:
        ran = [e for e in epochs_of.get((worker, job.trial), []) if job.start <= e <= job.stop]
        assert ran == list(range(job.start, job.start + len(ran)))
        spent = math.fsum(curves.curves[job.curve].seconds[e - 1] for e in ran)
        if end < budget_s - 1e-9:
            assert end - start == pytest.approx(spent, abs=1e-9)
        else:  # cut at the budget: its finished epochs plus part of the next one
            assert spent <= end - start + 1e-9
        total += end - start
    assert out.compute == pytest.approx(total, rel=1e-12)
    assert out.compute_at == sorted(out.compute_at) and out.compute_at[-1] <= out.compute + 1e-9
    assert out.compute <= 4 * budget_s + 1e-9


def test_sha_promotes_exactly_the_top_third_of_each_rung(sim: Any) -> None:
    _, sha, out, _ = run(sim, "sha", budget=30.0)
    assert sha.rungs == [1, 3, 9] and sha.size == 27
    assert {len(values) for _, values, _ in sha.promotions} >= {27, 9}
    reached: dict[int, int] = {}
    for r in out.results:
        reached[r.trial] = max(reached.get(r.trial, 0), r.epoch)
    for rung, values, promoted in sha.promotions:
        top = sorted(values, key=lambda t: (-values[t], t))[: len(values) // 3]
        assert promoted == top and len(promoted) == len(values) // 3
        for trial in set(values) - set(promoted):  # only the promoted run past the rung
            assert reached[trial] == rung


def test_sha_brackets_of_a_given_size_and_curves_stretched_to_more_epochs(sim: Any) -> None:
    curves = sim.synthetic(40, epochs=81, seed=1)
    assert curves.epochs == 81 and all(len(c.seconds) == 81 for c in curves.curves)
    # the same shape stretched (the first curve draws the same level, start and rate): at
    # epoch 9k a curve of 81 epochs is where one of 9 is at epoch k, up to the noise
    short, long = sim.synthetic(40, epochs=9, seed=1).curves[0], curves.curves[0]
    for k in range(1, 10):
        assert long.values[9 * k - 1] == pytest.approx(short.values[k - 1], abs=0.03)
    assert long.values[8] > long.values[0] + 0.01  # and it does learn in between
    sha = sim.SCHEDULERS["sha"](sim.TrialSource(40, random.Random(0)), 81, 3, 81)
    assert sha.rungs == [1, 3, 9, 27, 81] and sha.size == 81
    out = sim.simulate(curves, sha, 16, 6 * curves.mean_trial_s)
    sizes = [(rung, len(values), len(promoted)) for rung, values, promoted in sha.promotions]
    assert (1, 81, 27) in sizes and (3, 27, 9) in sizes
    assert all(n == size // 3 for _, size, n in sizes)
    assert max(r.epoch for r in out.results) == 81


def test_asha_stops_trials_only_at_rungs_through_our_pruner(sim: Any) -> None:
    _, asha, out, budget_s = run(sim, "asha", budget=10.0)
    last: dict[int, int] = {}
    for r in out.results:
        last[r.trial] = max(last.get(r.trial, 0), r.epoch)
    cut = {job.trial for _, _, end, job in out.spans if end >= budget_s - 1e-9}
    stopped_at = {e for t, e in last.items() if t not in cut}
    assert stopped_at <= {1, 3, 9} and {1, 9} <= stopped_at  # pruned at rungs, some finish
    assert type(asha.pruner).__name__ == "AshaPruner"
    # at rung 1, about 1/3 of the trials continue (ASHA keeps the running top third)
    judged = [e for t, e in last.items() if t not in cut]
    assert 0.2 < sum(e > 1 for e in judged) / len(judged) < 0.6


def test_random_search_trains_every_trial_fully(sim: Any) -> None:
    _, _, out, budget_s = run(sim, "random")
    cut = {job.trial for _, _, end, job in out.spans if end >= budget_s - 1e-9}
    last: dict[int, int] = {}
    for r in out.results:
        last[r.trial] = max(last.get(r.trial, 0), r.epoch)
    assert {e for t, e in last.items() if t not in cut} == {9}


def test_promotion_asha_runs_rung_to_rung_and_promotes_at_most_a_third(sim: Any) -> None:
    _, promo, out, _ = run(sim, "asha-promo", budget=20.0)
    assert promo.rungs == [1, 3] and promo.pruner.promotion
    ran: dict[int, list[int]] = {}
    for r in out.results:
        ran.setdefault(r.trial, []).append(r.epoch)
    for epochs in ran.values():  # resumed after its pause: no epoch twice, none skipped
        assert epochs == list(range(1, len(epochs) + 1))
    for _, _, _, job in out.spans:  # every job ends at a rung (a pause) or the last epoch
        assert job.stop in (1, 3, 9) and (job.start, job.stop) in ((1, 1), (2, 3), (4, 9))
    assert {done for _, done, _ in promo.promoted} == {1, 3}, "the drill proved nothing"
    for trial, done, reason in promo.promoted:  # each in its rung's top floor(n/η) right then
        assert reason["step"] == done and reason["rank"] <= reason["promotable"]
        assert reason["promotable"] == reason["of"] // 3 and trial in ran
    # ASHA promotes from the top set as it is when a worker frees up; a trial that later drops
    # out of it keeps its promotion, so more than floor(n/η) of a rung may leave it in all
    # (as in the ASHA paper), but never more than the trials that were once in the top set.
    for rung in (1, 3):
        assert sum(done == rung for _, done, _ in promo.promoted) < len(promo.values[rung])


def test_the_compute_to_reach_random_searchs_best(sim: Any) -> None:
    """``run_all`` gives every search random search's best of the same seed and workers as a
    second target: random search reaches it with its own compute (ratio 1), and a search that
    got there spent at most all its compute; one that never did counts as infinite. Taken
    over random search's whole compute, the ratio is at most the one over what it needed."""
    curves = sim.synthetic(40, epochs=9, seed=1)
    rows = sim.run_all(curves, [4], seeds=2, budget=6.0, eta=3, target=0.9, processes=1)
    for seed in range(2):
        plain = rows["random"][4][seed]
        assert plain["compute_to_random_best_s"] is not None
        assert plain["compute_to_random_best_s"] <= plain["compute_s"]
        assert sim.to_random_best(plain, plain) == 1.0
        spent = plain["compute_to_random_best_s"] / plain["compute_s"]
        assert sim.to_random_budget(plain, plain) == spent <= 1.0
        for name in sim.SCHEDULERS:
            row = rows[name][4][seed]
            got = row["compute_to_random_best_s"]
            assert got is None or got <= row["compute_s"] + 1e-9
            assert (got is None) == (row["best"] < plain["best"])
            # of random search's whole compute: never more than of what it needed for its best
            assert sim.to_random_budget(row, plain) <= sim.to_random_best(row, plain)
    never = {**plain, "compute_to_random_best_s": None}
    assert sim.to_random_best(never, plain) == math.inf
    assert sim.to_random_budget(never, plain) == math.inf
