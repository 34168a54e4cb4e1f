"""Sampler accuracy per denoiser evaluation, on a Gaussian mixture whose ideal denoiser is exact.

The data is `example_mixture(dim)` (dim = 2 and 16, float64); the denoiser is its closed-form
E[x0 | x; sigma], so every error below is the sampler's own discretisation error, not a model's.
Every sampler in SAMPLERS runs at budgets of 5, 10, 20 and 50 denoiser evaluations (Euler also at 100,
the baseline), on `karras(steps, 0.002, 80)` with the number of steps chosen so that its cost fits the
budget as closely as possible (heun: 2 n - 1 evaluations, pc: (n_corrector + 1) n, others: n; rk45 is
adaptive, so it takes the tolerance from a sweep whose count comes closest to the budget without going
over, or, where none fits, the cheapest one, marked `*`). The evaluation counts reported are the ones a
CountingDenoiser saw, not the budgets.

Metrics, all samplers starting from the same noise:
  ODE error  - for deterministic samplers, sqrt(mean_i |x_i - ref_i|^2) against a converged solution of
               the probability-flow ODE from the same noise (dopri5 at rtol = atol = 1e-10 in
               u = log sigma from 80 to 0.002, then x0_hat at 0.002, as every sampler's last step does);
  sliced W2  - `sliced_wasserstein` between the samples and as many exact samples of the mixture. Two
               independent exact sets give the noise floor that no sampler can beat at this sample size.

Schedule search: the default schedule above is not the best one for every sampler, so for the published
comparison (the best sampler at <= 10 evaluations against Euler at 100) every deterministic sampler, Euler
at 100 included, also gets the best schedule of one shared grid: Karras, log-uniform (exponential), and
"jump" schedules (one exponential-integrator step from sigma_max to s1, then log-uniform down to sigma_min).
The grid is scored on the same noise as the results, so it favours samplers with fewer steps no more than
Euler. A larger sigma_min is paid for in the error: the reference stays at sigma = 0.002. Last, the
few-step samplers run on schedules fitted by `unnoise.diffusion.schedule_fit.fit_schedule` to 512 other
noises (held out from the evaluation), against Euler at 100 on Karras and on its best grid schedule.

Run: .venv/bin/python benchmarks/samplers.py [--samples N] [--seed S] [--quick]
Writes benchmarks/results/samplers.md and samplers.json (not with --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torchdiffeq import odeint

from unnoise.demo import CountingDenoiser
from unnoise.diffusion.samplers import SAMPLERS, STOCHASTIC, sample
from unnoise.diffusion.schedule_fit import fit_schedule, ode_reference
from unnoise.diffusion.schedules import exponential, karras
from unnoise.testing import GaussianMixture, example_mixture, sliced_wasserstein

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
DIMS = (2, 16)
BUDGETS = (5, 10, 20, 50)
BASELINE = ("euler", 100)
SUMMARY_BUDGET = 10
PC_CORRECTOR_STEPS = 1
OPTIONS = {"pc": {"n_corrector": PC_CORRECTOR_STEPS}}
RK45_TOLERANCES = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6)
REFERENCE_TOL = 1e-10
CHECK_TOL = 1e-12  # a tighter solve, to estimate the reference's own error
FIT_SAMPLERS = ("euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc")
FIT_CALIBRATION = 512  # calibration noises for fitting, drawn apart from the evaluation noise
FIT_SAMPLER_RUNS = 2000
PROJECTION_SEED = 0  # the sliced-Wasserstein directions are the same for every comparison
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Problem:
    """One dimension's data: the mixture, the shared starting noise, exact samples and the ODE reference."""

    dim: int
    mixture: GaussianMixture
    noise: torch.Tensor  # (B, dim) unit noise, scaled to sigma_max by `sample`
    exact: torch.Tensor  # (B, dim) exact samples of the mixture
    reference: torch.Tensor  # (B, dim) converged probability-flow ODE solution from `noise`


@dataclass(frozen=True)
class Row:
    """One sampler run at one budget."""

    dim: int
    sampler: str
    budget: int
    steps: int | None  # None for rk45, whose steps are adaptive
    tol: float | None  # rk45's rtol = atol
    evaluations: int  # as counted
    ode_error: float | None  # None for stochastic samplers
    sliced_w2: float
    seconds: float


# --- the problem and its reference ------------------------------------------------------------------------


def probability_flow_ode(mixture: GaussianMixture, noise: torch.Tensor, tol: float) -> torch.Tensor:
    """x0_hat at sigma_min after dopri5 on dx/du = x - D(x, e^u), u = log sigma, from sigma_max."""

    def velocity(u, x):
        return x - mixture(x, torch.full((x.shape[0],), math.exp(float(u)), dtype=x.dtype))

    u = torch.tensor([math.log(SIGMA_MAX), math.log(SIGMA_MIN)], dtype=torch.float64)
    x = odeint(velocity, noise * SIGMA_MAX, u, method="dopri5", rtol=tol, atol=tol)[-1]
    return mixture(x, torch.full((x.shape[0],), SIGMA_MIN, dtype=x.dtype))


def make_problem(dim: int, samples: int, seed: int) -> Problem:
    mixture = example_mixture(dim)
    noise = torch.randn(samples, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    exact = mixture.sample(samples, torch.Generator().manual_seed(seed + 1))
    return Problem(dim, mixture, noise, exact, probability_flow_ode(mixture, noise, REFERENCE_TOL))


def rms_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Root mean square over samples of the Euclidean distance to the reference."""
    return float((x - reference).flatten(1).norm(dim=1).pow(2).mean().sqrt())


def distance(x: torch.Tensor, exact: torch.Tensor) -> float:
    return sliced_wasserstein(x, exact, generator=torch.Generator().manual_seed(PROJECTION_SEED))


# --- running samplers at a budget ---------------------------------------------------------------------


def cost(name: str, steps: int) -> int:
    """Denoiser evaluations of `steps` steps of a fixed-step sampler, the last step to sigma = 0 included."""
    if name == "heun":
        return 2 * steps - 1
    if name == "pc":
        return (PC_CORRECTOR_STEPS + 1) * steps
    return steps


def steps_for_budget(name: str, budget: int) -> int:
    """The most steps whose cost fits the budget."""
    return max(n for n in range(1, budget + 1) if cost(name, n) <= budget)


def measure(
    problem: Problem,
    name: str,
    budget: int,
    steps: int,
    seed: int,
    sigmas: torch.Tensor | None = None,
    **options,
) -> Row:
    """Run one sampler from the problem's noise (on `sigmas`, default Karras) and score it."""
    counted = CountingDenoiser(problem.mixture)
    start = time.perf_counter()
    x = sample(
        counted,
        problem.noise,
        karras(steps, SIGMA_MIN, SIGMA_MAX) if sigmas is None else sigmas,
        sampler=name,
        generator=torch.Generator().manual_seed(seed),
        **OPTIONS.get(name, {}),
        **options,
    )
    seconds = time.perf_counter() - start
    ode_error = None if name in STOCHASTIC else rms_error(x, problem.reference)
    return Row(
        dim=problem.dim,
        sampler=name,
        budget=budget,
        steps=None if name == "rk45" else steps,
        tol=options.get("rtol"),
        evaluations=counted.evaluations,
        ode_error=ode_error,
        sliced_w2=distance(x, problem.exact),
        seconds=seconds,
    )


def rk45_sweep(problem: Problem, seed: int, tolerances: tuple[float, ...]) -> list[Row]:
    """rk45 at each tolerance; it uses only sigmas[0] and sigmas[-2], so any karras(n >= 2) will do."""
    return [measure(problem, "rk45", 0, 2, seed, rtol=tol, atol=tol) for tol in tolerances]


def rk45_at_budget(sweep: list[Row], budget: int) -> Row:
    """The run that comes closest to the budget without exceeding it, else the cheapest run."""
    fitting = [row for row in sweep if row.evaluations <= budget]
    if not fitting:
        return replace(min(sweep, key=lambda row: row.evaluations), budget=budget)
    return replace(max(fitting, key=lambda row: (row.evaluations, -row.tol)), budget=budget)


def sampler_order() -> list[str]:
    """Deterministic samplers first, each group in registration order."""
    return sorted(SAMPLERS, key=lambda name: name in STOCHASTIC)


def benchmark(problem: Problem, seed: int, tolerances: tuple[float, ...]) -> list[Row]:
    sweep = rk45_sweep(problem, seed, tolerances)
    rows = []
    for name in sampler_order():
        for budget in BUDGETS:
            if name == "rk45":
                rows.append(rk45_at_budget(sweep, budget))
            else:
                rows.append(measure(problem, name, budget, steps_for_budget(name, budget), seed))
    name, budget = BASELINE
    rows.append(measure(problem, name, budget, steps_for_budget(name, budget), seed))
    return rows


# --- the best schedule of a shared grid ---------------------------------------------------------------


def schedule_grid(n: int):
    """(label, sigmas) of n steps each: Karras, log-uniform, and a jump from sigma_max then log-uniform."""
    for sigma_min in (0.002, 0.02):
        yield f"karras(min {sigma_min})", karras(n, sigma_min, SIGMA_MAX)
    for sigma_min in (0.01, 0.03, 0.05, 0.1):
        yield f"exponential(min {sigma_min})", exponential(n, sigma_min, SIGMA_MAX)
    for s1 in (2.0, 3.0, 5.0, 10.0):
        for sigma_min in (0.03, 0.05, 0.1):
            sigmas = torch.cat(
                [torch.tensor([SIGMA_MAX], dtype=torch.float64), exponential(n - 1, sigma_min, s1)]
            )
            yield f"jump(to {s1}, min {sigma_min})", sigmas


def best_schedule_runs(problem: Problem, seed: int) -> list[tuple[str, Row]]:
    """Each deterministic fixed-step sampler at SUMMARY_BUDGET, and the baseline, on its best schedule."""
    runs = [(name, SUMMARY_BUDGET) for name in sampler_order() if name not in STOCHASTIC and name != "rk45"]
    best = []
    for name, budget in [*runs, BASELINE]:
        steps = steps_for_budget(name, budget)
        scored = [
            (label, measure(problem, name, budget, steps, seed, sigmas))
            for label, sigmas in schedule_grid(steps)
        ]
        best.append(min(scored, key=lambda pair: pair[1].ode_error))
    return best


def fitted_schedule_runs(problem: Problem, seed: int, sampler_runs: int) -> list[tuple[str, Row]]:
    """Each FIT_SAMPLERS at SUMMARY_BUDGET on a schedule fitted to other noise, scored on the problem's."""
    calibration = torch.randn(
        FIT_CALIBRATION, problem.dim, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64
    )
    reference = ode_reference(
        problem.mixture, calibration, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, tolerance=REFERENCE_TOL
    )
    runs = []
    for name in FIT_SAMPLERS:
        steps = steps_for_budget(name, SUMMARY_BUDGET)
        fitted = fit_schedule(
            problem.mixture,
            calibration,
            steps=steps,
            sampler=name,
            reference=reference,
            max_sampler_runs=sampler_runs,
        )
        label = "fitted: " + ", ".join(f"{v:.3g}" for v in fitted.sigmas.tolist())
        runs.append((label, measure(problem, name, SUMMARY_BUDGET, steps, seed, fitted.sigmas)))
    return runs


def schedule_section(title: str, runs: list[tuple[str, Row]], baselines: list[tuple[str, Row]]):
    """A table of runs and baselines, and a summary line: the best run against each baseline."""
    label, best = min(runs, key=lambda pair: pair[1].ode_error)
    verdicts = [
        f"{base.sampler}@{base.evaluations} ({base_label}) {base.ode_error:.3e}, ratio"
        f" {best.ode_error / base.ode_error:.2f} {'PASS' if best.ode_error <= base.ode_error else 'FAIL'}"
        for base_label, base in baselines
    ]
    passed = all(best.ode_error <= base.ode_error for _, base in baselines)
    line = (
        f"dim {best.dim}, {title}: {best.sampler} at {best.evaluations} evaluations {best.ode_error:.3e}"
        f" vs " + "; ".join(verdicts)
    )
    lines = [
        "",
        f"### dim = {best.dim}: {title}",
        "",
        "| sampler | evaluations | schedule | ODE error |",
        "|---|---:|---|---:|",
        *(f"| {r.sampler} | {r.evaluations} | {lab} | {r.ode_error:.2e} |" for lab, r in [*runs, *baselines]),
        "",
    ]
    return lines, {
        "dim": best.dim,
        "title": title,
        "schedule": label,
        "best": asdict(best),
        "baselines": [asdict(base) for _, base in baselines],
        "pass": passed,
        "line": line,
    }


# --- reporting ------------------------------------------------------------------------------------------


def cell(row: Row | None, value: float | None) -> str:
    if row is None:
        return ""
    if value is None:
        return "-"
    over = "*" if row.evaluations > row.budget else ""
    return f"{value:.2e} ({row.evaluations}{over})"


def pivot(rows: list[Row], metric: str) -> list[str]:
    """A markdown table: one line per sampler, one column per budget, cells `value (evaluations)`."""
    budgets = sorted({row.budget for row in rows})
    by_key = {(row.sampler, row.budget): row for row in rows}
    lines = [
        "| sampler | " + " | ".join(f"NFE <= {b}" for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for name in sampler_order():
        cells = [by_key.get((name, b)) for b in budgets]
        lines.append(f"| {name} | " + " | ".join(cell(r, r and getattr(r, metric)) for r in cells) + " |")
    return lines


def rk45_note(rows: list[Row]) -> str:
    tolerances = ", ".join(f"{row.budget}: {row.tol:g}" for row in rows if row.sampler == "rk45")
    return f"rk45 tolerance per budget: {tolerances}. `*`: over budget (its loosest tolerance costs more)."


def dim_section(dim: int, rows: list[Row], floor: float, reference_error: float | None) -> list[str]:
    checked = "" if reference_error is None else f"; vs a {CHECK_TOL:g} solve: {reference_error:.1e}"
    return [
        f"## dim = {dim}",
        "",
        f"ODE error (RMS distance to the converged probability-flow ODE solution{checked}),"
        " cell = `error (evaluations counted)`:",
        "",
        *pivot(rows, "ode_error"),
        "",
        f"Sliced W2 to exact samples (noise floor, exact vs exact: {floor:.2e}):",
        "",
        *pivot(rows, "sliced_w2"),
        "",
        rk45_note(rows),
        "",
    ]


def summarize(dim: int, rows: list[Row]) -> dict:
    """Best deterministic sampler at <= SUMMARY_BUDGET counted evaluations against Euler's baseline."""
    candidates = [r for r in rows if r.ode_error is not None and r.evaluations <= SUMMARY_BUDGET]
    best = min(candidates, key=lambda r: r.ode_error)
    baseline = next(r for r in rows if (r.sampler, r.budget) == BASELINE)
    passed = best.ode_error <= baseline.ode_error
    line = (
        f"dim {dim}: best at <= {SUMMARY_BUDGET} evaluations: {best.sampler} ({best.evaluations} evals)"
        f" ODE error {best.ode_error:.3e}; {baseline.sampler} at {baseline.evaluations} evaluations:"
        f" {baseline.ode_error:.3e}; best@{SUMMARY_BUDGET} <= {baseline.sampler}@{baseline.budget}:"
        f" {'PASS' if passed else 'FAIL'}"
    )
    return {"dim": dim, "best": asdict(best), "baseline": asdict(baseline), "pass": passed, "line": line}


def write_results(markdown: str, record: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "samplers.md").write_text(markdown)
    (RESULTS / "samplers.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {RESULTS / 'samplers.md'} and {RESULTS / 'samplers.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000, help="samples per run (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and exact samples")
    parser.add_argument("--quick", action="store_true", help="256 samples, fewer rk45 tolerances, no files")
    args = parser.parse_args()
    samples = min(args.samples, 256) if args.quick else args.samples
    tolerances = RK45_TOLERANCES[:5] if args.quick else RK45_TOLERANCES

    start = time.perf_counter()
    sections, summaries, all_rows, dims = [], [], [], {}
    for dim in DIMS:
        problem = make_problem(dim, samples, args.seed)
        other = problem.mixture.sample(samples, torch.Generator().manual_seed(args.seed + 2))
        floor = distance(other, problem.exact)
        reference_error = (
            None
            if args.quick
            else rms_error(probability_flow_ode(problem.mixture, problem.noise, CHECK_TOL), problem.reference)
        )
        rows = benchmark(problem, args.seed + 3, tolerances)
        sections += dim_section(dim, rows, floor, reference_error)
        summaries.append(summarize(dim, rows))
        grid_runs = best_schedule_runs(problem, args.seed + 3)
        default_baseline = ("karras", next(r for r in rows if (r.sampler, r.budget) == BASELINE))
        grid_baseline = grid_runs[-1]
        fitted_runs = fitted_schedule_runs(problem, args.seed, 300 if args.quick else FIT_SAMPLER_RUNS)
        for title, runs, baselines in [
            ("each sampler on its best schedule of the grid", grid_runs[:-1], [grid_baseline]),
            (
                f"schedules fitted on {FIT_CALIBRATION} other noises",
                fitted_runs,
                [default_baseline, grid_baseline],
            ),
        ]:
            lines, summary = schedule_section(title, runs, baselines)
            sections += lines
            summaries.append(summary)
        all_rows += rows
        dims[dim] = {"noise_floor": floor, "reference_error_estimate": reference_error}
    wall = time.perf_counter() - start

    header = [
        "# Samplers at a fixed budget of denoiser evaluations",
        "",
        f"`example_mixture(dim)`, exact denoiser, float64, {samples} samples, seed {args.seed},"
        f" `karras(steps, {SIGMA_MIN}, {SIGMA_MAX})`, torch {torch.__version__}.",
        "",
    ]
    footer = ["## Summary", "", *(s["line"] for s in summaries), "", f"wall time: {wall:.1f} s", ""]
    markdown = "\n".join(header + sections + footer)
    print(markdown)
    record = {
        "settings": {
            "samples": samples,
            "seed": args.seed,
            "quick": args.quick,
            "sigma_min": SIGMA_MIN,
            "sigma_max": SIGMA_MAX,
            "budgets": [*BUDGETS, BASELINE[1]],
            "rk45_tolerances": list(tolerances),
            "reference_tol": REFERENCE_TOL,
            "torch": torch.__version__,
        },
        "dims": dims,
        "rows": [asdict(row) for row in all_rows],
        "summary": summaries,
        "wall_seconds": wall,
    }
    if args.quick:
        print("--quick: results not written")
    else:
        write_results(markdown, record)


if __name__ == "__main__":
    main()
