"""Schedulers in simulated time: learning curves replayed on virtual workers, no training.

The idea of Syne Tune's simulated backend: a recorded (or parametric) table of learning curves
stands in for training, and an event queue advances a virtual clock from one epoch's end to the
next, so a search with 64 workers and hours of training replays in well under a second. Each
sampled trial follows one curve of the table (random search over the recorded configurations,
with replacement); an epoch takes the seconds recorded for it.

A scheduler sees events, not machinery (:class:`Scheduler`): ``next_job()`` when a worker is
free, ``on_result()`` after each epoch (continue or stop), ``on_job_end()`` when the job left its
worker. A :class:`Job` runs one trial from epoch ``start`` to epoch ``stop``: ``start > 1``
resumes a paused trial from its checkpoint, so promotion-style schedulers (ASHA with
promotions, Hyperband) are jobs per rung, and PBT is a job whose trial continues a donor's
checkpoint with a new curve (the replay approximation). Compared here:

- ``random``: random search, every trial trained to the full budget;
- ``sha``: synchronous successive halving, the ASHA paper's baseline: brackets of
  ``--bracket`` trials (default ``eta**len(rungs)``); a rung's top ``1/eta`` (by the value at
  the rung) are promoted once the whole rung is in; a free worker with nothing to do in open
  brackets opens a new one;
- ``asha``: every trial starts at epoch 1 and reports each epoch to OUR pruner
  (``hpo.service.pruners.asha.AshaPruner``), judged against an in-memory ``PruningHistory`` as
  the service judges against SQL; a prune decision stops the trial there;
- ``asha-promo``: ASHA's promotion variant on the same pruner (``mode: promotion``): jobs run
  to the next rung and pause; a free worker resumes the best promotable paused trial
  (``AshaPruner.promotion_order``) before it starts a new one.

Measured per worker count and seed, in a wall-time budget of ``--budget`` mean full trials per
worker: time and compute (busy worker-seconds) until some trial first reports
``val_accuracy >= --target`` (every epoch checkpoints, so that model exists), the compute used
in all, and the best final accuracy (best value of a trial trained to the last epoch); and,
against random search's best value in the same run (same workers and seed), the compute by
which each search first reached it, as a fraction of the compute random search needed for it
(``c→rnd best ×rnd``) and of all the compute random search spent, its budget, at whose end
that best is its result (``÷rnd all``); medians over seeds. The issue's target for promotion
ASHA ("reaches random search's best with <= 1/3 of its compute") reads either way: random
search cannot know it holds its best before its budget is spent, but where it finds it early
only the first, stricter one tells the searches apart.

    python benchmarks/simulate.py                          # the recorded digits curves
    python benchmarks/simulate.py --synthetic 400 --target 0.9
    python benchmarks/simulate.py --workers 4 16 64 --seeds 5 --json /tmp/sim.json
"""

from __future__ import annotations

import argparse
import gzip
import heapq
import json
import math
import random
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "benchmarks" / "data" / "digits_curves.json.gz"

# ------------------------------------------------------------------------------ the curves


@dataclass(frozen=True)
class Curve:
    """One configuration's validation accuracy after each epoch and each epoch's seconds."""

    values: tuple[float, ...]
    seconds: tuple[float, ...]


@dataclass(frozen=True)
class CurveSet:
    curves: tuple[Curve, ...]
    source: str

    @property
    def epochs(self) -> int:
        return len(self.curves[0].values)

    @property
    def mean_trial_s(self) -> float:
        """Mean seconds of a trial trained for every epoch."""
        return statistics.fmean(sum(c.seconds) for c in self.curves)


def load_recorded(path: Path = RECORDED) -> CurveSet:
    """The curves ``benchmarks/record_curves.py`` wrote."""
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    curves = tuple(
        Curve(tuple(c["val_accuracy"]), tuple(max(s, 1e-3) for s in c["seconds"]))
        for c in data["curves"]
    )
    return CurveSet(curves, f"{path.name}: {len(curves)} {data['trainable']} configurations")


def synthetic(n: int, epochs: int = 9, seed: int = 0) -> CurveSet:
    """A parametric surrogate: ``a(e) = top - (top - start) * exp(-rate * e)`` plus noise, the
    final level, speed and epoch time drawn per configuration (some never learn). The rate is
    drawn for 9 epochs and scaled by ``9 / epochs``: more epochs stretch the same shapes, so a
    curve of 81 epochs is as far along at epoch 9k as one of 9 is at epoch k."""
    rng = random.Random(seed)
    curves = []
    for _ in range(n):
        top = 0.1 if rng.random() < 0.1 else rng.uniform(0.5, 0.99)
        start, rate = rng.uniform(0.1, top), rng.uniform(0.1, 1.5) * 9 / epochs
        values = [
            min(1.0, top - (top - start) * math.exp(-rate * e) + rng.gauss(0, 0.005))
            for e in range(1, epochs + 1)
        ]
        per_epoch = rng.lognormvariate(0, 0.5)
        seconds = [per_epoch * rng.uniform(0.9, 1.1) for _ in range(epochs)]
        curves.append(Curve(tuple(values), tuple(seconds)))
    return CurveSet(tuple(curves), f"synthetic: {n} curves, seed {seed}")


# --------------------------------------------------------------------- the scheduler seam


@dataclass(frozen=True)
class Job:
    """Run ``trial`` (following curve ``curve``) from epoch ``start`` through ``stop``;
    ``start > 1`` resumes it from its checkpoint after epoch ``start - 1``."""

    trial: int
    curve: int
    start: int
    stop: int


class Scheduler(Protocol):
    """What the simulator asks a scheduler. Plug in a new one by implementing these three."""

    def next_job(self) -> Job | None:
        """Work for a free worker, or None (the worker waits for the next event)."""
        ...

    def on_result(self, job: Job, epoch: int, value: float) -> bool:
        """``job`` finished ``epoch`` with ``value``: True to continue, False to stop it."""
        ...

    def on_job_end(self, job: Job, last_epoch: int) -> None:
        """``job`` left its worker after ``last_epoch`` (its ``stop``, or where it stopped)."""
        ...


class TrialSource:
    """New trials: consecutive ids, each following a curve drawn at random."""

    def __init__(self, n_curves: int, rng: random.Random) -> None:
        self.n_curves, self.rng, self.count = n_curves, rng, 0

    def new(self) -> tuple[int, int]:
        self.count += 1
        return self.count - 1, self.rng.randrange(self.n_curves)


class RandomSearch:
    """Every trial trained for all epochs."""

    def __init__(self, trials: TrialSource, epochs: int) -> None:
        self.trials, self.epochs = trials, epochs

    def next_job(self) -> Job | None:
        trial, curve = self.trials.new()
        return Job(trial, curve, 1, self.epochs)

    def on_result(self, job: Job, epoch: int, value: float) -> bool:
        return True

    def on_job_end(self, job: Job, last_epoch: int) -> None:
        pass


def rungs_of(min_epochs: int, eta: int, epochs: int) -> list[int]:
    """``min_epochs * eta**k`` below ``epochs``, then ``epochs`` itself."""
    rungs, r = [], min_epochs
    while r < epochs:
        rungs.append(r)
        r *= eta
    return [*rungs, epochs]


@dataclass
class Bracket:
    """One synchronous successive-halving bracket: its rung, what still has to run there,
    and the values in so far."""

    rung: int
    pending: list[tuple[int, int]]  # (trial, curve) to run up to the rung
    running: int = 0
    values: dict[int, float] = field(default_factory=dict)
    curves: dict[int, int] = field(default_factory=dict)


class SynchronousSHA:
    """Successive halving with a barrier at every rung (Jamieson & Talwalkar 2016; the
    synchronous baseline of Li et al. 2020). ``promotions`` records each decision as
    (rung epoch, {trial: value at the rung}, promoted trials)."""

    def __init__(
        self,
        trials: TrialSource,
        epochs: int,
        eta: int = 3,
        min_epochs: int = 1,
        size: int | None = None,
    ) -> None:
        self.trials, self.eta = trials, eta
        self.rungs = rungs_of(min_epochs, eta, epochs)
        self.size = size or eta ** len(self.rungs)
        self.open: list[Bracket] = []
        self.bracket_of: dict[int, Bracket] = {}
        self.promotions: list[tuple[int, dict[int, float], list[int]]] = []

    def next_job(self) -> Job | None:
        for bracket in self.open:  # the oldest bracket first
            if bracket.pending:
                return self._start(bracket)
        pending = [self.trials.new() for _ in range(self.size)]
        self.open.append(Bracket(0, pending))
        return self._start(self.open[-1])

    def _start(self, bracket: Bracket) -> Job:
        trial, curve = bracket.pending.pop(0)
        bracket.running += 1
        bracket.curves[trial] = curve
        self.bracket_of[trial] = bracket
        start = 1 if bracket.rung == 0 else self.rungs[bracket.rung - 1] + 1
        return Job(trial, curve, start, self.rungs[bracket.rung])

    def on_result(self, job: Job, epoch: int, value: float) -> bool:
        if epoch == job.stop:
            self.bracket_of[job.trial].values[job.trial] = value
        return True

    def on_job_end(self, job: Job, last_epoch: int) -> None:
        bracket = self.bracket_of.pop(job.trial)
        bracket.running -= 1
        if bracket.pending or bracket.running:
            return  # the rung's barrier: wait for every trial of it
        if bracket.rung == len(self.rungs) - 1:
            self.open.remove(bracket)
            return
        ranked = sorted(bracket.values, key=lambda t: (-bracket.values[t], t))
        promoted = ranked[: max(1, len(ranked) // self.eta)]
        self.promotions.append((self.rungs[bracket.rung], dict(bracket.values), promoted))
        bracket.pending = [(t, bracket.curves[t]) for t in promoted]
        bracket.rung += 1
        bracket.values, bracket.curves = {}, {}


class MemoryHistory:
    """The ``PruningHistory`` protocol over the values reported so far (every trial reports
    every epoch, so a trial's value at its first step >= ``step`` is its value at ``step``)."""

    def __init__(self) -> None:
        self.at: dict[int, list[float]] = {}
        self.complete = 0

    def values_at(self, step: int, *, complete_only: bool = False) -> list[float]:
        if complete_only:
            raise NotImplementedError("the median pruner is not simulated")
        return list(self.at.get(step, ()))

    def n_complete(self) -> int:
        return self.complete


def asha_pruner(mode: str, epochs: int, eta: int, min_epochs: int) -> Any:
    """OUR ``AshaPruner`` (``hpo.service.pruners.asha``) for a study maximizing
    ``val_accuracy``, with rungs from ``min_epochs`` by ``eta`` below ``epochs``."""
    from hpo.service.pruners import make_pruner
    from hpo.service.spec import StudySpec

    pruner = {"type": "asha", "mode": mode, "reduction_factor": eta}
    pruner |= {"min_steps": min_epochs, "max_steps": epochs}
    spec = {
        "name": "simulated",
        "objective": {"metric": "val_accuracy", "direction": "maximize"},
        "pruner": pruner,
        "space": {"x": {"type": "float", "low": 0, "high": 1}},
    }
    return make_pruner(StudySpec.model_validate(spec))


class AshaStopping:
    """Every trial from epoch 1; after each epoch OUR ``AshaPruner`` judges the report against
    the other trials' values (judged before this value is recorded, as the service does)."""

    def __init__(self, trials: TrialSource, epochs: int, eta: int = 3, min_epochs: int = 1):
        self.pruner = asha_pruner("stopping", epochs, eta, min_epochs)
        self.trials, self.epochs, self.history = trials, epochs, MemoryHistory()

    def next_job(self) -> Job | None:
        trial, curve = self.trials.new()
        return Job(trial, curve, 1, self.epochs)

    def on_result(self, job: Job, epoch: int, value: float) -> bool:
        from hpo.service.pruners.base import Report

        previous = epoch - 1 if epoch > 1 else None
        decision = self.pruner.judge(Report(epoch, value, previous), self.history)
        self.history.at.setdefault(epoch, []).append(value)
        return decision is None

    def on_job_end(self, job: Job, last_epoch: int) -> None:
        self.history.complete += last_epoch == self.epochs


class AshaPromotion:
    """ASHA's promotion variant (``pruner: {type: asha, mode: promotion}``): a trial runs to
    its next rung and pauses there; a free worker first resumes the best paused trial that OUR
    ``AshaPruner.promotion_order`` finds promotable (in the top ``floor(n/η)`` of its rung, the
    order the service's ask uses), and starts a new trial only when none is. A resume costs
    nothing here beyond its epochs (the service loads the checkpoint: about a second)."""

    def __init__(self, trials: TrialSource, epochs: int, eta: int = 3, min_epochs: int = 1):
        self.pruner = asha_pruner("promotion", epochs, eta, min_epochs)
        self.trials, self.epochs = trials, epochs
        self.rungs = self.pruner.rungs(epochs)
        self.values: dict[int, dict[int, float]] = {}  # epoch -> trial -> value
        self.paused: dict[int, int] = {}  # trial -> the epoch it paused after
        self.curve_of: dict[int, int] = {}
        # (trial, epoch it paused at, the pruner's reason) in promotion order
        self.promoted: list[tuple[int, int, dict]] = []

    def _stop_after(self, done: int) -> int:
        """The epoch a job that resumes after ``done`` pauses at: the next rung, else the end."""
        return next((r for r in self.rungs if r > done), self.epochs)

    def next_job(self) -> Job | None:
        order = self.pruner.promotion_order(self.paused, self.values)
        if order:
            trial = order[0].trial_id
            done = self.paused.pop(trial)
            self.promoted.append((trial, done, order[0].reason))
            return Job(trial, self.curve_of[trial], done + 1, self._stop_after(done))
        trial, curve = self.trials.new()
        self.curve_of[trial] = curve
        return Job(trial, curve, 1, self._stop_after(0))

    def on_result(self, job: Job, epoch: int, value: float) -> bool:
        self.values.setdefault(epoch, {})[job.trial] = value
        return True

    def on_job_end(self, job: Job, last_epoch: int) -> None:
        if last_epoch < self.epochs:
            self.paused[job.trial] = last_epoch


# Each takes (trials, epochs, eta, bracket): ``bracket`` is SHA's bracket size (None: its default).
SCHEDULERS: dict[str, Callable[..., Scheduler]] = {
    "random": lambda trials, epochs, eta, bracket=None: RandomSearch(trials, epochs),
    "sha": lambda trials, epochs, eta, bracket=None: SynchronousSHA(
        trials, epochs, eta, size=bracket
    ),
    "asha": lambda trials, epochs, eta, bracket=None: AshaStopping(trials, epochs, eta),
    "asha-promo": lambda trials, epochs, eta, bracket=None: AshaPromotion(trials, epochs, eta),
}

# ---------------------------------------------------------------------------- the simulator


@dataclass(frozen=True)
class Result:
    time: float
    worker: int
    trial: int
    epoch: int
    value: float


@dataclass
class Outcome:
    """What one simulated search did: every epoch result, every job's (worker, start, end)
    span on the clock, and the busy worker-seconds (epochs cut at the budget count up to it)."""

    results: list[Result] = field(default_factory=list)
    spans: list[tuple[int, float, float, Job]] = field(default_factory=list)
    compute: float = 0.0
    compute_at: list[float] = field(default_factory=list)  # compute when each result came in

    def first_reaching(self, target: float) -> tuple[float, float] | None:
        """(time, compute) when a result first reached ``target``."""
        for result, compute in zip(self.results, self.compute_at, strict=True):
            if result.value >= target:
                return result.time, compute
        return None

    def best_final(self, epochs: int) -> float:
        return max((r.value for r in self.results if r.epoch == epochs), default=float("nan"))


def simulate(curves: CurveSet, scheduler: Scheduler, workers: int, budget_s: float) -> Outcome:
    """Replay ``scheduler``'s search on ``workers`` virtual workers for ``budget_s`` seconds."""
    out = Outcome()
    events: list[tuple[float, int, int]] = []  # (epoch end, sequence, worker)
    running: dict[int, tuple[Job, int, float, float]] = {}  # worker -> job, epoch, started...
    free, seq, now, done_s = list(range(workers - 1, -1, -1)), 0, 0.0, 0.0
    starts = 0.0  # the sum of the running epochs' start times

    def begin(worker: int, job: Job, epoch: int, job_start: float) -> None:
        nonlocal seq, starts
        seconds = curves.curves[job.curve].seconds[epoch - 1]
        running[worker] = (job, epoch, now, job_start)
        starts += now
        heapq.heappush(events, (now + seconds, seq, worker))
        seq += 1

    while True:
        while free and (job := scheduler.next_job()) is not None:
            begin(free.pop(), job, job.start, now)
        if not events or events[0][0] > budget_s:
            break
        now, _, worker = heapq.heappop(events)
        job, epoch, epoch_start, job_start = running.pop(worker)
        done_s += now - epoch_start
        starts -= epoch_start
        in_flight = len(running) * now - starts
        value = curves.curves[job.curve].values[epoch - 1]
        out.results.append(Result(now, worker, job.trial, epoch, value))
        out.compute_at.append(done_s + in_flight)
        if scheduler.on_result(job, epoch, value) and epoch < job.stop:
            begin(worker, job, epoch + 1, job_start)
        else:
            out.spans.append((worker, job_start, now, job))
            scheduler.on_job_end(job, epoch)
            free.append(worker)
    end = budget_s if events else now
    for worker, (job, _, epoch_start, job_start) in running.items():  # cut at the budget
        done_s += end - epoch_start
        out.spans.append((worker, job_start, end, job))
    out.compute = done_s
    return out


# ------------------------------------------------------------------------------ the report


def one_run(
    curves: CurveSet,
    name: str,
    workers: int,
    seed: int,
    budget_s: float,
    eta: int,
    target: float,
    bracket: int | None = None,
    random_best: float | None = None,
) -> dict[str, float | None]:
    """The figures of one simulated search. ``random_best``: the best value random search
    reached with the same workers, seed and budget; when given, the compute by which this
    search first reached it too."""
    trials = TrialSource(len(curves.curves), random.Random(seed))
    scheduler = SCHEDULERS[name](trials, curves.epochs, eta, bracket)
    out = simulate(curves, scheduler, workers, budget_s)
    hit = out.first_reaching(target)
    figures = {
        "time_to_target_s": hit[0] if hit else None,
        "compute_to_target_s": hit[1] if hit else None,
        "compute_s": out.compute,
        "best_final": out.best_final(curves.epochs),
        "best": max((r.value for r in out.results), default=float("nan")),
        "trials": trials.count,
    }
    if random_best is not None:
        got = out.first_reaching(random_best)
        figures["compute_to_random_best_s"] = got[1] if got else None
    return figures


def run_all(
    curves: CurveSet,
    workers: list[int],
    seeds: int,
    budget: float,
    eta: int,
    target: float,
    processes: int = 2,
    bracket: int | None = None,
) -> dict[str, dict[int, list[dict[str, float | None]]]]:
    """Per scheduler and worker count, one row of figures per seed (``processes`` at once)."""
    from multiprocessing import Pool

    budget_s = budget * curves.mean_trial_s
    runs = [(n, w, seed) for n in SCHEDULERS for w in workers for seed in range(seeds)]
    with Pool(processes) as pool:
        # random search first (cheap): its best value is each search's second target
        plain = [("random", w, seed) for w in workers for seed in range(seeds)]
        best = {
            r[1:]: f["best"]
            for r, f in zip(
                plain,
                pool.starmap(one_run, [(curves, *r, budget_s, eta, target) for r in plain]),
                strict=True,
            )
        }
        found = pool.starmap(
            one_run,
            [(curves, *r, budget_s, eta, target, bracket, best[r[1:]]) for r in runs],
        )
    rows: dict[str, dict[int, list[dict[str, float | None]]]] = {n: {} for n in SCHEDULERS}
    for (name, w, _), figures in zip(runs, found, strict=True):
        rows[name].setdefault(w, []).append(figures)
    return rows


def median(values: list[float | None]) -> float:
    """The median, a seed that never reached the target counting as infinite."""
    return statistics.median(math.inf if v is None else v for v in values)


def to_random_best(row: dict[str, float | None], plain: dict[str, float | None]) -> float:
    """The compute by which a search first reached random search's best (same seed and
    workers), over the compute random search needed for it; infinite if it never did."""
    mine, theirs = row["compute_to_random_best_s"], plain["compute_to_random_best_s"]
    return math.inf if mine is None or not theirs else mine / theirs


def to_random_budget(row: dict[str, float | None], plain: dict[str, float | None]) -> float:
    """The compute by which a search first reached random search's best (same seed and
    workers), over all the compute random search spent; infinite if it never did."""
    mine, spent = row["compute_to_random_best_s"], plain["compute_s"]
    return math.inf if mine is None or not spent else mine / spent


def print_table(rows: dict, workers: list[int], target: float, budget_s: float) -> None:
    print(f"target val_accuracy >= {target}; budget {budget_s:.0f} s of simulated wall time")
    print(
        f"{'workers':>7} {'scheduler':>10} {'reached':>7} {'t→target s':>10} {'×SHA':>5} "
        f"{'compute→t s':>11} {'×SHA':>5} {'compute s':>10} {'best final':>10} {'trials':>6}"
        f" {'c→rnd best ×rnd':>15} {'÷rnd all':>8}"
    )
    for n in workers:
        base = rows["sha"][n]
        for name in SCHEDULERS:
            r = rows[name][n]
            t, c = (
                median([x["time_to_target_s"] for x in r]),
                median([x["compute_to_target_s"] for x in r]),
            )
            t_sha = median([x["time_to_target_s"] for x in base])
            c_sha = median([x["compute_to_target_s"] for x in base])
            reached = sum(x["time_to_target_s"] is not None for x in r)
            pairs = list(zip(r, rows["random"][n], strict=True))
            vs_random = statistics.median(to_random_best(x, p) for x, p in pairs)
            vs_budget = statistics.median(to_random_budget(x, p) for x, p in pairs)
            print(
                f"{n:>7} {name:>10} {reached:>5}/{len(r)} {t:>10.1f} {t / t_sha:>5.2f} "
                f"{c:>11.0f} {c / c_sha:>5.2f} {statistics.fmean(x['compute_s'] for x in r):>10.0f}"
                f" {statistics.fmean(x['best_final'] for x in r):>10.4f}"
                f" {statistics.fmean(x['trials'] for x in r):>6.0f} {vs_random:>15.2f}"
                f" {vs_budget:>8.2f}"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=RECORDED, help="recorded curves (.json.gz)")
    parser.add_argument("--synthetic", type=int, default=None, help="N parametric curves")
    parser.add_argument("--epochs", type=int, default=9, help="epochs of each synthetic curve")
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=12, help="mean full trials per worker")
    parser.add_argument("--eta", type=int, default=3)
    parser.add_argument(
        "--bracket", type=int, default=None, help="SHA's trials per bracket (eta**rungs)"
    )
    parser.add_argument("--target", type=float, default=0.98)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.synthetic:
        curves = synthetic(args.synthetic, epochs=args.epochs)
    else:
        curves = load_recorded(args.data)
    print(f"{curves.source}, {curves.epochs} epochs, mean trial {curves.mean_trial_s:.2f} s")
    rows = run_all(
        curves,
        args.workers,
        args.seeds,
        args.budget,
        args.eta,
        args.target,
        args.processes,
        args.bracket,
    )
    print_table(rows, args.workers, args.target, args.budget * curves.mean_trial_s)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
