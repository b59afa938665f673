"""Our samplers against plain Optuna, side by side on standard test functions.

Our ``tpe`` and ``gp`` samplers wrap Optuna's TPESampler and GPSampler, but they run a fresh
engine over the stored trials on every ask and reseed it per trial. This
script checks that doing so costs no search quality: for each test function and seed it drives
our samplers sequentially through ``StudyView``/``ObservedTrial`` (no server) and plain Optuna's
samplers through ask/tell with the same seed and options, on the same objective, and prints the
regret (best value found minus the known minimum) of each, mean ± std over seeds.

    python benchmarks/samplers.py            # defaults: 10 seeds, 100 trials (gp: 50), ~10 min
    python benchmarks/samplers.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna

from hpo.service.samplers import make_sampler
from hpo.service.samplers.base import ObservedTrial, StudyView
from hpo.service.spec import CategoricalParam, FloatParam, StudySpec

optuna.logging.set_verbosity(optuna.logging.ERROR)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

N_STARTUP = 10  # our spec's default n_startup_trials, also Optuna's default
SAMPLERS = ("random", "tpe", "gp")
Params = dict[str, Any]


# --- test functions --------------------------------------------------------------------------


def branin(p: Params) -> float:
    x1, x2 = p["x1"], p["x2"]
    b, c = 5.1 / (4 * math.pi**2), 5 / math.pi
    return (x2 - b * x1**2 + c * x1 - 6) ** 2 + 10 * (1 - 1 / (8 * math.pi)) * math.cos(x1) + 10


_H_A = np.array(
    [
        [10, 3, 17, 3.5, 1.7, 8],
        [0.05, 10, 17, 0.1, 8, 14],
        [3, 3.5, 1.7, 10, 17, 8],
        [17, 8, 0.05, 10, 0.1, 14],
    ]
)
_H_P = 1e-4 * np.array(
    [
        [1312, 1696, 5569, 124, 8283, 5886],
        [2329, 4135, 8307, 3736, 1004, 9991],
        [2348, 1451, 3522, 2883, 3047, 6650],
        [4047, 8828, 8732, 5743, 1091, 381],
    ]
)
_H_ALPHA = np.array([1.0, 1.2, 3.0, 3.2])


def hartmann6(p: Params) -> float:
    x = np.array([p[f"x{i}"] for i in range(6)])
    return float(-_H_ALPHA @ np.exp(-(_H_A * (x - _H_P) ** 2).sum(axis=1)))


def quadratic(p: Params) -> float:
    return float(sum(p[f"x{i}"] ** 2 for i in range(4)))


def mixed(p: Params) -> float:
    """Float, log-float, int, categorical and a parameter active only for one branch; min 0."""
    branch = {"a": 1.0, "b": (p.get("y", 0.0) - 3) ** 2 / 4, "c": 2.0}[p["model"]]
    return (
        (p["x"] - 1) ** 2 / 4
        + (p["n"] - 12) ** 2 / 25
        + (math.log10(p["lr"]) + 2) ** 2 / 4
        + branch
    )


def _floats(names: Sequence[str], low: float, high: float) -> dict[str, Any]:
    return {n: {"type": "float", "low": low, "high": high} for n in names}


@dataclass(frozen=True)
class Problem:
    name: str
    space: dict[str, Any]
    fn: Callable[[Params], float]  # noiseless
    minimum: float
    noise: float = 0.0  # std of Gaussian noise added to what the sampler observes


PROBLEMS = [
    Problem("branin", {**_floats(["x1"], -5, 10), **_floats(["x2"], 0, 15)}, branin, 0.397887),
    Problem("hartmann6", _floats([f"x{i}" for i in range(6)], 0, 1), hartmann6, -3.32237),
    Problem("noisy-quad4", _floats([f"x{i}" for i in range(4)], -5, 5), quadratic, 0.0, 1.0),
    Problem(
        "mixed",
        {
            "model": {"type": "categorical", "choices": ["a", "b", "c"]},
            "x": {"type": "float", "low": -5, "high": 5},
            "n": {"type": "int", "low": 1, "high": 30},
            "lr": {"type": "float", "low": 1e-5, "high": 1.0, "log": True},
            "y": {"type": "float", "low": 0, "high": 10, "when": {"model": ["b"]}},
        },
        mixed,
        0.0,
    ),
]


# --- one run ---------------------------------------------------------------------------------


@dataclass
class Run:
    best: float  # noiseless value of the trial with the best observed value, minus the minimum
    seconds_per_trial: float


def observe(problem: Problem, params: Params, seed: int, number: int) -> tuple[float, float]:
    """(observed value, noiseless value); the noise depends on (seed, number) only, so both
    sides of the comparison see the same noise at the same trial number."""
    clean = problem.fn(params)
    if problem.noise == 0:
        return clean, clean
    rng = np.random.default_rng([seed, number, 7919])
    return clean + problem.noise * float(rng.standard_normal()), clean


def _regret(problem: Problem, results: list[tuple[float, float]]) -> float:
    return min(results)[1] - problem.minimum


def run_ours(problem: Problem, sampler: str, seed: int, n_trials: int) -> Run:
    spec = StudySpec.model_validate(
        {
            "name": f"bench-{problem.name}",
            "objective": {"metric": "value"},
            "sampler": {"type": sampler, "seed": seed, "n_startup_trials": N_STARTUP},
            "space": problem.space,
        }
    )
    engine = make_sampler(spec)
    trials: list[ObservedTrial] = []
    results: list[tuple[float, float]] = []
    start = time.perf_counter()
    for number in range(n_trials):
        params = engine.suggest(StudyView(spec, list(trials), number)).params
        value, clean = observe(problem, params, seed, number)
        trials.append(ObservedTrial(number, "complete", params, values=(value,)))
        results.append((value, clean))
    return Run(_regret(problem, results), (time.perf_counter() - start) / n_trials)


def plain_optuna_sampler(
    sampler: str, seed: int, conditional: bool, defaults: bool = False
) -> optuna.samplers.BaseSampler:
    """Optuna's own sampler with the options our wrappers pass (see service/samplers/*.py),
    or with ``defaults`` Optuna's own defaults (only the seed given)."""
    if sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if defaults:
        cls = optuna.samplers.TPESampler if sampler == "tpe" else optuna.samplers.GPSampler
        return cls(seed=seed)
    if sampler == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=N_STARTUP,
            multivariate=True,
            group=conditional,
            constant_liar=True,
        )
    return optuna.samplers.GPSampler(
        seed=seed, n_startup_trials=N_STARTUP, warn_independent_sampling=False
    )


def _suggest_plain(trial: optuna.Trial, spec: StudySpec) -> Params:
    params: Params = {}
    for name in spec.parameter_order():
        if not spec.is_active(name, params):
            continue
        p = spec.space[name]
        if isinstance(p, CategoricalParam):
            params[name] = trial.suggest_categorical(name, p.choices)
        elif isinstance(p, FloatParam):
            params[name] = trial.suggest_float(name, p.low, p.high, log=p.log)
        else:
            params[name] = trial.suggest_int(name, p.low, p.high, log=p.log)
    return params


def run_optuna(
    problem: Problem, sampler: str, seed: int, n_trials: int, defaults: bool = False
) -> Run:
    spec = StudySpec.model_validate(
        {"name": "bench", "objective": {"metric": "value"}, "space": problem.space}
    )
    conditional = any(p.when for p in spec.space.values())
    study = optuna.create_study(sampler=plain_optuna_sampler(sampler, seed, conditional, defaults))
    results: list[tuple[float, float]] = []
    start = time.perf_counter()
    for number in range(n_trials):
        trial = study.ask()
        params = _suggest_plain(trial, spec)
        value, clean = observe(problem, params, seed, number)
        study.tell(trial, value)
        results.append((value, clean))
    return Run(_regret(problem, results), (time.perf_counter() - start) / n_trials)


# --- report ----------------------------------------------------------------------------------


@dataclass
class Cell:
    ours: list[Run] = field(default_factory=list)
    optuna: list[Run] = field(default_factory=list)


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _fmt(xs: Sequence[float]) -> str:
    m, s = _mean_std(xs)
    return f"{m:.3g} ± {s:.2g}"


def welch_t(a: Sequence[float], b: Sequence[float]) -> float:
    """Welch's t statistic of mean(a) - mean(b); 0 when both are constant."""
    (ma, sa), (mb, sb) = _mean_std(a), _mean_std(b)
    se = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    return 0.0 if se == 0 else (ma - mb) / se


def report(cells: dict[tuple[str, str], Cell], n_seeds: int, trials: dict[str, int]) -> str:
    head = (
        f"| function | sampler | trials | ours regret | optuna regret | ours/optuna | t "
        f"| ours ms/trial | optuna ms/trial |\n|{'---|' * 9}"
    )
    rows = [head]
    for (fname, sname), cell in cells.items():
        ours = [r.best for r in cell.ours]
        plain = [r.best for r in cell.optuna]
        mo, mp = statistics.fmean(ours), statistics.fmean(plain)
        ratio = f"{mo / mp:.2f}" if mp > 0 else "n/a"
        ms_o = 1000 * statistics.fmean(r.seconds_per_trial for r in cell.ours)
        ms_p = 1000 * statistics.fmean(r.seconds_per_trial for r in cell.optuna)
        rows.append(
            f"| {fname} | {sname} | {trials[sname]} | {_fmt(ours)} | {_fmt(plain)} | {ratio} "
            f"| {welch_t(ours, plain):+.1f} | {ms_o:.1f} | {ms_p:.1f} |"
        )
    lines = [
        f"regret = best noiseless value found - known minimum; mean ± std over {n_seeds} seeds.",
        "t = Welch t of ours - optuna (|t| < 2: no detectable difference).",
        "",
        *rows,
        "",
        "Model-based vs random (pooled ours + optuna random; gp may run fewer trials than random):",
    ]
    for fname in dict.fromkeys(f for f, _ in cells):
        if (fname, "random") not in cells:
            continue
        rand = cells[fname, "random"]
        base = [r.best for r in rand.ours + rand.optuna]
        for sname in ("tpe", "gp"):
            if (fname, sname) not in cells:
                continue
            for side in ("ours", "optuna"):
                xs = [r.best for r in getattr(cells[fname, sname], side)]
                t = welch_t(base, xs)
                verdict = "clearly better" if t > 2 else "not clearly better"
                lines.append(
                    f"  {fname:12s} {sname:3s} ({side:6s}) mean regret {statistics.fmean(xs):.3g}"
                    f" vs random {statistics.fmean(base):.3g}: {verdict} (t={t:+.1f})"
                )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10, help="seeds per cell (default 10)")
    ap.add_argument("--trials", type=int, default=100, help="trials for random/tpe (default 100)")
    ap.add_argument("--gp-trials", type=int, default=50, help="trials for gp (default 50)")
    ap.add_argument("--functions", nargs="+", default=[p.name for p in PROBLEMS])
    ap.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    ap.add_argument("--quick", action="store_true", help="2 seeds, 20 trials (gp: 15)")
    ap.add_argument(
        "--optuna-defaults",
        action="store_true",
        help="Optuna's samplers with its own defaults (only the seed given), not our options",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.trials, args.gp_trials = 2, 20, 15
    trials = {"random": args.trials, "tpe": args.trials, "gp": args.gp_trials}
    problems = [p for p in PROBLEMS if p.name in args.functions]

    for sname in args.samplers:  # warm-up, untimed: imports (torch for gp) and first-call costs
        run_ours(PROBLEMS[0], sname, 0, N_STARTUP + 2)
        run_optuna(PROBLEMS[0], sname, 0, N_STARTUP + 2)
    cells: dict[tuple[str, str], Cell] = {}
    t0 = time.perf_counter()
    for problem in problems:
        for sname in args.samplers:
            cell = cells.setdefault((problem.name, sname), Cell())
            for seed in range(args.seeds):
                cell.ours.append(run_ours(problem, sname, seed, trials[sname]))
                cell.optuna.append(
                    run_optuna(problem, sname, seed, trials[sname], args.optuna_defaults)
                )
            print(f"  {problem.name} {sname}: done ({time.perf_counter() - t0:.0f}s)", flush=True)
    print()
    print(report(cells, args.seeds, trials))
    side = "its own defaults" if args.optuna_defaults else "our wrappers' options"
    print(f"\ntotal {time.perf_counter() - t0:.0f}s, optuna {optuna.__version__} ({side})")


if __name__ == "__main__":
    main()
