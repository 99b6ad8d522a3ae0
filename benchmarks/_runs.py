"""Shared machinery of the benchmark scripts: train a shipped recipe with overrides and
a seed, evaluate it on held-out prompts at chosen step counts (along training too),
cache every finished run as JSON so that a rerun resumes, and format the tables.

Every run is built from a recipe file under ``recipes/`` plus ``--set``-style overrides
(``mdmrl.recipe.load``), through the same registry and :class:`mdmrl.engine.Trainer`
as ``mdmrl run``, so the benchmarks measure what users run. The overrides that only
size a run for the benchmark's budget (batch, group, training steps, iterations) come
from :class:`Budget`.

Held-out numbers are the overall mean of the total reward (and of each component) over
the first ``eval_prompts`` prompts of the recipe's ``[prompts.eval]`` source, with the
evaluation noise of :func:`mdmrl.evaluate.eval_seed` (the same draws for every model,
so models are compared on common random numbers). The spread reported for a trained
configuration is the standard deviation over *training* seeds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "shapes"
OUT = ROOT / "benchmarks" / "out"

#: Bumped when the meaning of a cached result changes (invalidates the cache).
CACHE_VERSION = 1


def recipe_path(name: str) -> Path:
    """``recipes/shapes/<name>.toml``."""
    return RECIPES / f"{name}.toml"


# --------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class Budget:
    """How big every run of a benchmark is.

    batch/group: images per iteration and GRPO group size G (both phases);
    train_steps: T of the training rollouts; timestep_fraction, minibatches: the
    engine's settings (None = the recipe's); cycles, model_iterations, schedule_iterations: the
    alternating plan (N_m, N_s per cycle); eval_prompts: held-out prompts per
    evaluation; eval_seeds: samples per prompt for a trained model (its spread is over
    training seeds); fixed_seeds: samples per prompt for an untrained model (its spread
    is over these sampling seeds); minutes: wall-clock training budget per run
    (compare_methods); table2_steps, transfer_steps: step counts of Table 2 / 5b;
    target_steps: (learned, fixed) step counts of performance target (i);
    eval_count: the size of the held-out prompt set (``prompts.eval.options.count``;
    None = the recipe's); guidance: the guidance scale s of every recipe's fixed schedule,
    or of the Gaussian policy's base schedule (None = each recipe's own); cpu_clock: a
    ``minutes`` budget counts this process's CPU time instead of wall-clock time (with one
    torch thread, the same work whatever else shares the machine).
    """

    name: str
    batch: int = 8
    group: int = 4
    train_steps: int = 8
    timestep_fraction: float | None = None
    minibatches: int | None = None
    cycles: int = 3
    model_iterations: int = 2
    schedule_iterations: int = 2
    eval_prompts: int = 12
    eval_seeds: int = 1
    fixed_seeds: int = 3
    minutes: float = 0.5
    table2_steps: tuple[int, ...] = (8, 32)
    transfer_steps: tuple[int, ...] = (4, 8, 16, 32, 48)
    target_steps: tuple[int, int] = (8, 32)
    eval_count: int | None = None
    guidance: float | None = None
    cpu_clock: bool = False
    smoke: bool = False

    @property
    def iterations(self) -> int:
        """Total iterations of the alternating plan (naive and joint runs get as many)."""
        return self.cycles * (self.model_iterations + self.schedule_iterations)

    def sizing(self) -> list[str]:
        """Overrides that size a run: batch, group, steps, loss terms, no images."""
        out = [
            f"sampler.steps={self.train_steps}",
            f"train.rollout_batch={self.batch}",
            "logging.image_every=0",
            "logging.tensorboard=false",
            "logging.kl_every=0",  # the KL monitor changes no update; benchmarks skip its cost
        ]
        if self.timestep_fraction is not None:
            out.append(f"train.timestep_fraction={self.timestep_fraction}")
        if self.minibatches is not None:
            out.append(f"train.minibatches={self.minibatches}")
        if self.eval_count is not None:
            out.append(f"prompts.eval.options.count={self.eval_count}")
        for phase in ("model", "schedule"):
            out += [f"train.{phase}.batch_size={self.batch}", f"train.{phase}.group_size={self.group}"]
        if self.smoke:
            out += SMOKE_BACKBONE
        return out


#: A random-weight, tiny ``shapes-mdm`` for smoke runs (seconds, no weights file).
SMOKE_BACKBONE = [
    'backbone.options.weights="random"',
    "backbone.options.layers=1",
    "backbone.options.width=16",
    "backbone.options.heads=2",
    "backbone.options.text_layers=0",
    "backbone.options.text_len=12",
    "backbone.options.patch=4",
]

SMOKE = Budget(
    name="smoke",
    batch=4,
    group=2,
    train_steps=2,
    cycles=2,
    model_iterations=1,
    schedule_iterations=1,
    eval_prompts=6,
    eval_seeds=1,
    fixed_seeds=2,
    minutes=0.003,
    table2_steps=(2, 4),
    transfer_steps=(2, 4),
    target_steps=(2, 4),
    smoke=True,
)


#: The decisive runs of docs/results.md: benchmarks/iteration_cost.py's "fast"
#: configuration (64 images per iteration, G = 8, T = 8, a quarter of the steps replayed
#: in one minibatch), guidance-free as the quickstart (s = 1 in every recipe), 3 cycles
#: of 6 model + 4 schedule iterations, 120 held-out prompts x 2 sampling seeds per
#: evaluation of a trained model and x 4 of an untrained one.
DECISIVE = Budget(
    name="decisive",
    batch=64,
    group=8,
    train_steps=8,
    timestep_fraction=0.25,
    minibatches=1,
    cycles=3,
    model_iterations=6,
    schedule_iterations=4,
    eval_prompts=120,
    eval_count=120,
    eval_seeds=2,
    fixed_seeds=4,
    guidance=1.0,
)


def pick_budget(name: str, budgets: dict[str, Budget], smoke: bool) -> Budget:
    """The named budget, or :data:`SMOKE` when ``smoke``."""
    return SMOKE if smoke else budgets[name]


def guidance_override(raw: dict, scale: float) -> str:
    """The override that sets the guidance scale of ``raw``'s schedule: the fixed
    schedule's own ``cfg_scale``, or the Gaussian policy's base schedule's."""
    schedule = raw.get("schedule", {})
    if schedule.get("name") == "gaussian":
        return f"schedule.options.base_options.cfg_scale={scale}"
    return f"schedule.options.cfg_scale={scale}"


# --------------------------------------------------------------------------- evaluation


def summarize_eval(res: dict) -> dict[str, Any]:
    """Reduce :func:`mdmrl.evaluate.evaluate`'s output to the overall numbers:
    {metric: {"mean", "std", "per_seed"}} plus per-category means of the total."""
    out: dict[str, Any] = {}
    for metric, table in res["metrics"].items():
        o = table["overall"]
        out[metric] = {"mean": o["mean"], "std": o["std"], "per_seed": o["per_seed"]}
    out["categories"] = {c: v["mean"] for c, v in res["metrics"]["total"].items() if c != "overall"}
    return out


def evaluate_parts(parts, loaded, steps: int, n_prompts: int, seeds: int) -> dict[str, Any]:
    """Held-out evaluation of built parts at ``steps`` steps (see module docstring)."""
    from mdmrl.evaluate import evaluate

    prompts = parts.eval_prompts.evaluation()[:n_prompts]
    cats = parts.eval_prompts.categorize(prompts)
    t0 = time.perf_counter()
    res = evaluate(
        parts.backbone,
        parts.schedule,
        parts.sampler,
        parts.rewarder,
        prompts,
        cats,
        steps,
        seeds,
        deterministic=loaded.recipe.eval.deterministic_schedule,
        batch_size=max(loaded.recipe.train.rollout_batch, n_prompts * seeds),
    )
    out = summarize_eval(res)
    out["steps"] = steps
    out["prompts"] = len(prompts)
    out["seeds"] = seeds
    out["seconds"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------- runs


@dataclass
class RunSpec:
    """One training run: a recipe, its overrides and a training seed.

    eval_every: evaluate at ``train_steps`` after these iteration counts (along
    training); final_steps: step counts evaluated after the last iteration; minutes:
    stop training once this much wall-clock time went into iterations (the plan is
    then made long enough never to end first)."""

    label: str
    recipe: str
    overrides: list[str] = field(default_factory=list)
    seed: int = 0
    eval_every: list[int] = field(default_factory=list)
    final_steps: list[int] = field(default_factory=list)
    minutes: float | None = None


class Runner:
    """Trains and evaluates :class:`RunSpec` s for one benchmark script, caching each
    finished run under ``out_dir`` (JSON), and logging progress to stderr.

    With ``cache_only`` nothing is computed: a run that is not in the cache is
    returned as None and counted in ``missing`` (for partial tables).

    ``recipes``: the folder a :class:`RunSpec`'s recipe name is looked up in
    (``<recipes>/<name>.toml``; default ``recipes/shapes``)."""

    def __init__(
        self,
        budget: Budget,
        out_dir: Path,
        device: str | None = None,
        log: Callable[[str], None] | None = None,
        cache_only: bool = False,
        recipes: Path | None = None,
    ):
        self.budget = budget
        self.recipes = Path(recipes) if recipes is not None else RECIPES
        self.cache_only = cache_only
        self.missing = 0
        self.found = 0
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.device = device
        self._log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.started = time.perf_counter()

    def log(self, msg: str) -> None:
        self._log(f"[{time.perf_counter() - self.started:7.1f}s] {msg}")

    # -- recipes -----------------------------------------------------------------------
    def overrides(self, extra: Sequence[str]) -> list[str]:
        out = self.budget.sizing() + list(extra)
        if self.device:
            out.append(f'device="{self.device}"')
        return out

    def load(self, recipe: str, extra: Sequence[str], seed: int = 0):
        from mdmrl import recipe as rc

        path = self.recipes / f"{recipe}.toml"
        overrides = self.overrides(extra) + [f"seed={seed}"]
        if self.budget.guidance is not None:
            overrides.append(
                guidance_override(rc.apply_overrides(rc.read_toml(path), overrides), self.budget.guidance)
            )
        # one budget sizes recipes of every mode: keep only the keys this recipe's mode uses
        # (e.g. no train.schedule in naive mode; train.iterations or train.cycles, not both)
        return rc.load(path, rc.effective_overrides(rc.read_toml(path), overrides))

    def _key(self, kind: str, loaded, plan: dict) -> str:
        from mdmrl.engine import recipe_digest

        payload = json.dumps(
            {"v": CACHE_VERSION, "kind": kind, "recipe": recipe_digest(loaded), "plan": plan}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:20]

    def _cached(self, key: str) -> dict | None:
        p = self.out_dir / f"{key}.json"
        data = None
        if p.is_file():
            try:
                data = json.loads(p.read_text())
            except ValueError:
                data = None
        if data is not None:
            self.found += 1
        return data

    def _store(self, key: str, data: dict) -> None:
        p = self.out_dir / f"{key}.json"
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, p)

    # -- untrained evaluation --------------------------------------------------------
    def evaluate_untrained(
        self, label: str, recipe: str, extra: Sequence[str], steps: Sequence[int], seeds: int
    ) -> dict | None:
        """Evaluate a recipe's parts as built (no training) at each step count, with
        ``seeds`` sampling seeds. Returns {"label", "evals": {steps: summary}} (None
        when ``cache_only`` and not cached)."""
        from mdmrl.build import build_parts

        loaded = self.load(recipe, extra)
        plan = {"steps": list(steps), "seeds": seeds, "prompts": self.budget.eval_prompts}
        key = self._key("untrained", loaded, plan)
        hit = self._cached(key)
        if hit is not None:
            self.log(f"{label}: cached")
            return hit
        if self.cache_only:
            self.missing += 1
            return None
        parts = build_parts(loaded, self._device(loaded))
        evals = {}
        for t in steps:
            evals[str(t)] = evaluate_parts(parts, loaded, t, self.budget.eval_prompts, seeds)
            self.log(f"{label} @{t}: {evals[str(t)]['total']['mean']:.4f} ({evals[str(t)]['seconds']:.1f}s)")
        data = {"label": label, "recipe": recipe, "overrides": list(extra), "evals": evals}
        self._store(key, data)
        return data

    def _device(self, loaded) -> torch.device:
        from mdmrl.build import resolve_device

        return resolve_device(loaded.recipe.device)

    # -- training --------------------------------------------------------------------
    def train(self, spec: RunSpec) -> dict | None:
        """Train ``spec`` (or return its cached result; None when ``cache_only`` and
        not cached).

        Returns {"label", "seed", "iterations", "train_seconds", "curve": [per-iteration
        phase and training reward], "evals": {iteration: summary at train_steps},
        "final": {steps: summary}}."""
        from mdmrl.build import build_parts
        from mdmrl.engine import Trainer

        extra = list(spec.overrides)
        if spec.minutes is not None:
            extra += ["train.iterations=1000000", "train.cycles=100000"]
        loaded = self.load(spec.recipe, extra, spec.seed)
        b = self.budget
        plan = {
            "eval_every": sorted(spec.eval_every),
            "final": sorted(spec.final_steps),
            "minutes": spec.minutes,
            "prompts": b.eval_prompts,
            "seeds": b.eval_seeds,
        }
        key = self._key("train", loaded, plan)
        hit = self._cached(key)
        if hit is not None:
            self.log(f"{spec.label} seed {spec.seed}: cached")
            return hit
        if self.cache_only:
            self.missing += 1
            return None
        device = self._device(loaded)
        parts = build_parts(loaded, device)
        steps = loaded.recipe.sampler.steps
        with tempfile.TemporaryDirectory(prefix="mdmrl-bench-") as tmp:
            trainer = Trainer(loaded, parts, Path(tmp), device, log=self._log)
            curve, evals = [], {}
            train_s = 0.0
            clock = time.process_time if b.cpu_clock else time.perf_counter
            limit = None if spec.minutes is None else spec.minutes * 60.0
            marks = set(spec.eval_every)
            try:
                while trainer.iteration < len(trainer.plan):
                    if limit is not None and train_s >= limit:
                        break
                    t0 = clock()
                    row = trainer.iterate()
                    train_s += clock() - t0
                    curve.append(
                        {
                            "iteration": row["iteration"],
                            "phase": row["phase"],
                            "cycle": row["cycle"],
                            "reward_mean": row["reward_mean"],
                            "seconds": row["time_iteration"],
                            "bad_update": row.get("bad_update", 0.0),
                        }
                    )
                    if trainer.iteration in marks:
                        evals[str(trainer.iteration)] = evaluate_parts(
                            parts, loaded, steps, b.eval_prompts, b.eval_seeds
                        )
            finally:
                trainer.worker.close()
            final = {
                str(t): evaluate_parts(parts, loaded, t, b.eval_prompts, b.eval_seeds)
                for t in spec.final_steps
            }
        data = {
            "label": spec.label,
            "recipe": spec.recipe,
            "overrides": list(spec.overrides),
            "seed": spec.seed,
            "iterations": trainer.iteration,
            "train_seconds": train_s,
            "train_steps": steps,
            "curve": curve,
            "evals": evals,
            "final": final,
        }
        shown = ", ".join(f"@{t} {v['total']['mean']:.4f}" for t, v in final.items())
        self.log(f"{spec.label} seed {spec.seed}: {trainer.iteration} iterations in {train_s:.1f}s; {shown}")
        self._store(key, data)
        return data


# --------------------------------------------------------------------------- statistics


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error, sample std / sqrt(n) (NaN for a single value: one
    seed has no error estimate, and no difference from it is a finding)."""
    m, s = mean_std(values)
    return m, (s / math.sqrt(len(values)) if len(values) > 1 else math.nan)


def eval_se(ev: dict | None, metric: str = "total") -> tuple[float, float]:
    """(mean, standard error over its sampling seeds) of an evaluation summary's metric;
    NaNs when it is missing."""
    if not ev or metric not in ev:
        return math.nan, math.nan
    per_seed = ev[metric].get("per_seed") or [ev[metric]["mean"]]
    return float(ev[metric]["mean"]), mean_se(per_seed)[1]


def fmt(values: Sequence[float] | tuple[float, float], digits: int = 3) -> str:
    """``mean ± standard error`` of values (or of a given (mean, error) pair)."""
    m, s = values if isinstance(values, tuple) else mean_se(values)
    if math.isnan(m):
        return "—"
    if math.isnan(s):
        return f"{m:.{digits}f} (one seed)"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def difference(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """a − b and its standard error (independent estimates: the errors add in quadrature)."""
    return a[0] - b[0], math.sqrt(a[1] ** 2 + b[1] ** 2)


def verdict(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Whether a measured "a above b" holds: beyond two standard errors of the
    difference either way, or not separated."""
    d, se = difference(a, b)
    if math.isnan(d):
        return "not available"
    if math.isnan(se):
        return "no error estimate"
    if d > 2 * se:
        return "**reproduced**"
    if d < -2 * se:
        return "**reversed**"
    return "not separated"


def directions_table(claims: Sequence[tuple[str, tuple[float, float], tuple[float, float]]]) -> str:
    """A markdown table of (claim "a above b", a, b): both estimates, their difference
    with its standard error, and the :func:`verdict`."""
    rows = []
    for claim, a, b in claims:
        d = difference(a, b)
        diff = "—" if math.isnan(d[0]) else f"{d[0]:+.3f}" + ("" if math.isnan(d[1]) else f" ± {d[1]:.3f}")
        rows.append([claim, fmt(a), fmt(b), diff, verdict(a, b)])
    return table(["direction (a above b)", "a", "b", "a − b", "verdict (2 SE)"], rows)


def directions_summary(claims: Sequence[tuple[str, tuple[float, float], tuple[float, float]]]) -> str:
    """The claims of :func:`directions_table` grouped by :func:`verdict`, in plain words:
    a markdown list with one item per verdict that occurs ("- Reproduced (...): claim;
    claim."), in the order reproduced, reversed, not separated, no error estimate, not
    available."""
    words = {
        "**reproduced**": "Reproduced (a above b beyond two standard errors)",
        "**reversed**": "Reversed (b above a beyond two standard errors)",
        "not separated": "Not separated (within two standard errors)",
        "no error estimate": "No error estimate (one training seed)",
        "not available": "Not available (runs missing)",
    }
    groups: dict[str, list[str]] = {v: [] for v in words}
    for claim, a, b in claims:
        groups[verdict(a, b)].append(claim)
    lines = [f"- {words[v]}: " + "; ".join(cs) + "." for v, cs in groups.items() if cs]
    return "\n".join(lines)


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(str(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> str:
    """One line describing this machine (CPU model, cores, torch threads)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def sweep_order(seeds: list[int], rows: list, reverse: bool = False) -> list[tuple[int, Any]]:
    """Every (seed, row) of a sweep, seed-major; with ``reverse`` the same order backwards,
    rows included, so that a second process sharing the sweep (``--reverse``) meets the
    first in its middle instead of training the same seed's rows beside it."""
    order = [(s, row) for s in seeds for row in rows]
    return order[::-1] if reverse else order


def add_sweep_arguments(ap: argparse.ArgumentParser, cache: str, reverse: bool = False) -> None:
    """Add the options every results script shares to ``ap``: --json, --out (the cache
    folder, default ``benchmarks/out/<cache>/<budget>``), --device, --threads and
    --partial, and --reverse when the script's run loop can train its seeds last to
    first."""
    ap.add_argument("--json", help="write the raw numbers here")
    ap.add_argument("--out", help=f"cache folder (default benchmarks/out/{cache}/<budget>)")
    ap.add_argument("--device", help="override the recipes' device (e.g. cpu, cuda)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument(
        "--partial", action="store_true", help="compute nothing: print the tables from the cached runs so far"
    )
    if reverse:
        ap.add_argument(
            "--reverse",
            action="store_true",
            help="train the runs last to first (seeds and rows): a second invocation with the same --out beside a "
            "running one shares its cache and meets it in the middle",
        )


def setup_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1))


def run_and_report(
    script: str,
    title: str,
    argv: list[str] | None,
    json_path: str | None,
    runner: Runner,
    run: Callable[[], dict],
    render: Callable[[dict, Budget], tuple[str, dict]],
) -> None:
    """Run a results script's runs (``run()`` -> raw results), print its markdown
    (title, the exact command, date, machine and wall time, a PARTIAL line when cached
    runs are missing, then ``render``'s tables) and write the JSON file when asked."""
    from datetime import datetime, timezone

    b = runner.budget
    started = time.perf_counter()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    raw = run()
    text, nums = render(raw, b)
    wall = time.perf_counter() - started
    cmd = f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"{title}\n")
    print(f"`{cmd.strip()}` — {stamp}; {machine()}; wall time {wall / 60:.1f} min\n")
    if runner.missing:
        print(
            f"**PARTIAL**: {runner.found} of {runner.found + runner.missing} runs and evaluations are "
            "finished; missing cells show as —.\n"
        )
    print(text)
    write_json(
        json_path,
        {
            "command": cmd.strip(),
            "date": stamp,
            "machine": machine(),
            "wall_seconds": wall,
            "budget": asdict(b),
            "tables": nums,
            "raw": raw,
        },
    )


__all__ = [
    "add_sweep_arguments",
    "Budget",
    "DECISIVE",
    "difference",
    "directions_summary",
    "directions_table",
    "eval_se",
    "mean_se",
    "verdict",
    "SMOKE",
    "RunSpec",
    "Runner",
    "mean_std",
    "fmt",
    "table",
    "machine",
    "pick_budget",
    "run_and_report",
    "replace",
]
