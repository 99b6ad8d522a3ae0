"""Recipes: TOML files validated strictly before anything heavy runs.

A recipe names one implementation of each part (``[backbone]``, ``[schedule]``,
``[sampler]``, ``[[rewards]]``, ``[objective]``, ``[prompts.train]``,
``[prompts.eval]``), each with an ``options`` table validated by that plug-in's own
``Options`` dataclass, plus the engine's settings (``[train]``, ``[eval]``,
``[logging]``). All problems are reported at once, each with its dotted path.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from mdmrl import options as opts
from mdmrl.errors import ConfigError, PluginLookupError, UserError

MODES = ("naive", "schedule_only", "joint", "alternating")


def _f(default: Any = dataclasses.MISSING, doc: str = "", **meta: Any) -> Any:
    md = {"doc": doc, **meta}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=md)
    if callable(default) and not isinstance(default, (int, float, str, bool)):
        return field(default_factory=default, metadata=md)
    return field(default=default, metadata=md)


@dataclass
class PartSpec:
    name: str = _f(doc="registered name of the implementation (see `mdmrl plugins`)")
    options: dict = _f({}, doc="options of that implementation, validated by its own schema")


@dataclass
class SamplerSpec:
    name: str = _f("confidence", doc="registered sampler name")
    steps: int = _f(16, doc="denoising steps T used for training rollouts", min=1)
    options: dict = _f({}, doc="sampler options")


@dataclass
class RewardSpec:
    name: str = _f(doc="registered rewarder name")
    weight: float = _f(1.0, doc="weight of this component in the total reward")
    options: dict = _f({}, doc="rewarder options")


@dataclass
class PromptsSpec:
    train: PartSpec = _f(doc="training prompt stream")
    eval: PartSpec | None = _f(
        None, doc="held-out evaluation prompts (defaults to the training source's list)"
    )


@dataclass
class OptimSpec:
    lr: float = _f(1e-5, doc="learning rate (Adam)", min_exclusive=0.0)
    betas: list[float] = _f([0.9, 0.95], doc="Adam betas (beta1, beta2)", min=0.0, max_exclusive=1.0)
    weight_decay: float = _f(0.0, doc="decoupled weight decay (AdamW)", min=0.0)
    eps: float = _f(1e-8, doc="Adam epsilon", min_exclusive=0.0)
    group_size: int = _f(4, doc="G: samples per prompt (a GRPO group)", min=2)
    batch_size: int = _f(16, doc="images per iteration in this phase (prompts x G)", min=2)
    max_grad_norm: float | None = _f(1.0, doc="gradient-norm clip; none to disable", min_exclusive=0.0)


@dataclass
class TrainSpec:
    mode: str = _f("alternating", doc="which parameters train, and when", choices=list(MODES))
    iterations: int = _f(10, doc="iterations for the naive, schedule_only and joint modes", min=1)
    cycles: int = _f(1, doc="alternating mode: number of (model, schedule) cycles", min=1)
    model_iterations: int = _f(5, doc="alternating mode: N_m model iterations per cycle", min=0)
    schedule_iterations: int = _f(5, doc="alternating mode: N_s schedule iterations per cycle", min=0)
    schedule_first: bool = _f(False, doc="alternating mode: start each cycle with the schedule phase")
    model: OptimSpec = _f(OptimSpec, doc="optimizer and batch of the model (backbone) phase")
    schedule: OptimSpec = _f(
        lambda: OptimSpec(lr=1e-4, group_size=8), doc="optimizer and batch of the schedule phase"
    )
    epochs: int = _f(1, doc="passes over each rollout batch", min=1)
    minibatches: int = _f(1, doc="optimizer steps per pass (the batch is split)", min=1)
    timestep_fraction: float = _f(
        1.0,
        doc="fraction of the T steps (loss terms) trained per trajectory batch",
        min_exclusive=0.0,
        max=1.0,
    )
    term_chunk: int = _f(4, doc="loss terms back-propagated together (memory lever)", min=1)
    rollout_batch: int = _f(64, doc="trajectories sampled per sampler call (memory lever)", min=1)
    gradient_accumulation: int = _f(1, doc="minibatches accumulated per optimizer step", min=1)
    mixed_precision: str = _f(
        "no", doc="autocast dtype for rollouts and updates", choices=["no", "bf16", "fp16"]
    )
    background_rewards: bool = _f(False, doc="score rollout chunks on a background thread while sampling")
    max_bad_updates: int = _f(3, doc="non-finite rewards/losses in a row before the run stops", min=1)


@dataclass
class EvalSpec:
    steps: list[int] = _f([16], doc="step counts to evaluate at", min=1)
    seeds: int = _f(3, doc="samples (seeds) per prompt; the spread is over seeds", min=1)
    max_prompts: int | None = _f(None, doc="evaluate only the first N held-out prompts", min=1)
    before: bool = _f(True, doc="evaluate the untrained policies before training")
    after: bool = _f(True, doc="evaluate after training")
    deterministic_schedule: bool = _f(True, doc="use the schedule policy's mean action at evaluation")
    reference: PartSpec | None = _f(
        None,
        doc="a fixed schedule under which `mdmrl run` also evaluates the base model before "
        "training (label 'reference'), e.g. the guided schedule the base model is usually "
        "sampled with when the trained recipe samples without guidance",
    )


@dataclass
class LoggingSpec:
    checkpoint_every: int = _f(1, doc="iterations between checkpoints", min=1)
    keep_checkpoints: int = _f(2, doc="how many recent checkpoints to keep", min=1)
    image_every: int = _f(5, doc="iterations between image grids (0 = never)", min=0)
    tensorboard: bool = _f(True, doc="also write TensorBoard event files")
    kl_every: int = _f(
        1,
        doc="iterations between measurements of the KL from the frozen initial model to the "
        "current one on the rollout tokens (metrics kl_ref_k3 and kl_ref_seq; 0 = never, which "
        "also spares the reference copy when objective.options.kl_beta = 0)",
        min=0,
    )
    kl_steps: int = _f(
        2,
        doc="denoising steps replayed under the reference per KL measurement, rotating through "
        "the T steps from one measurement to the next (an unbiased estimate at kl_steps/T of the "
        "cost; 0 = every step)",
        min=0,
    )


@dataclass
class Recipe:
    backbone: PartSpec = _f(doc="the masked diffusion model")
    schedule: PartSpec = _f(doc="fixed schedule or learned schedule policy")
    rewards: list[RewardSpec] = _f(doc="reward components, summed with their weights")
    objective: PartSpec = _f(doc="the policy-gradient objective")
    prompts: PromptsSpec = _f(doc="where prompts come from")
    sampler: SamplerSpec = _f(SamplerSpec, doc="the sampler and the training step count")
    seed: int = _f(0, doc="seed of every random stream of the run", min=0)
    description: str = _f("", doc="free text shown by `mdmrl validate`")
    device: str = _f("auto", doc="auto, cpu, cuda or cuda:N")
    train: TrainSpec = _f(TrainSpec, doc="the training engine")
    eval: EvalSpec = _f(EvalSpec, doc="held-out evaluation")
    logging: LoggingSpec = _f(LoggingSpec, doc="checkpoints, images, logs")


@dataclass
class LoadedRecipe:
    """A validated recipe and the validated options of every part it names."""

    recipe: Recipe
    part_options: dict[str, Any]  # dotted path of the part ("backbone", "rewards[0]", ...) -> Options
    source: str
    raw: dict

    @property
    def directory(self) -> str:
        return str(Path(self.source).parent) if self.source != "<memory>" else "."


# -- overrides ------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """``key.sub=value`` -> (["key", "sub"], value); the value is parsed as TOML and
    falls back to a bare string."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected key.path=value, e.g. train.model.lr=3e-5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise UserError(f"--set {text!r}: empty key segment in {key!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each ``key.sub=value`` in a copy of ``raw``. List items are addressed by
    index (``rewards.0.weight=0.3``)."""
    import copy

    data = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = data
        for i, k in enumerate(keys[:-1]):
            if isinstance(node, list):
                if not k.isdigit() or int(k) >= len(node):
                    raise UserError(f"--set {text!r}: {'.'.join(keys[: i + 1])} is not an index of the list")
                node = node[int(k)]
            else:
                node = node.setdefault(k, {})
                if not isinstance(node, (dict, list)):
                    raise UserError(f"--set {text!r}: {'.'.join(keys[: i + 1])} is not a table")
        last = keys[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise UserError(f"--set {text!r}: {last} is not an index of the list")
            node[int(last)] = value
        else:
            node[last] = value
    return data


# -- loading ----------------------------------------------------------------------
def read_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: recipe file not found")
    if p.is_dir():
        raise UserError(f"{p}: is a directory, expected a .toml recipe file")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{p}: TOML syntax error: {exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"{p}: not a UTF-8 text file") from None


def _part_specs(raw: dict) -> list[tuple[str, str, Any, Any]]:
    """(dotted path, kind, name, options table) for each part the raw recipe names.

    Read from the raw table (not the built dataclass) so that plug-in names and
    options are checked even when other sections have problems."""

    def get(table: Any, key: str) -> Any:
        return table.get(key) if isinstance(table, dict) else None

    specs = []
    for path, kind in (
        ("backbone", "backbone"),
        ("schedule", "schedule"),
        ("sampler", "sampler"),
        ("objective", "objective"),
    ):
        specs.append((path, kind, get(raw.get(path), "name"), get(raw.get(path), "options")))
    prompts = raw.get("prompts")
    for sub in ("train", "eval"):
        t = get(prompts, sub)
        if t is not None:
            specs.append((f"prompts.{sub}", "prompts", get(t, "name"), get(t, "options")))
    ref = get(raw.get("eval"), "reference")
    if ref is not None:
        specs.append(("eval.reference", "schedule", get(ref, "name"), get(ref, "options")))
    rewards = raw.get("rewards")
    if isinstance(rewards, list):
        for i, r in enumerate(rewards):
            specs.append((f"rewards[{i}]", "rewarder", get(r, "name"), get(r, "options")))
    if "sampler" not in raw:
        specs[2] = ("sampler", "sampler", SamplerSpec().name, None)
    return specs


def _semantic_checks(recipe: Recipe, problems: list[str]) -> None:
    t = recipe.train
    for phase in ("model", "schedule"):
        o: OptimSpec = getattr(t, phase)
        if o.batch_size % o.group_size:
            problems.append(
                f"train.{phase}.batch_size: {o.batch_size} is not a multiple of "
                f"train.{phase}.group_size {o.group_size}"
            )
        if len(o.betas) != 2:
            problems.append(f"train.{phase}.betas: expected 2 numbers, got {len(o.betas)}")
    if t.mode == "alternating" and t.model_iterations + t.schedule_iterations < 1:
        problems.append("train.model_iterations + train.schedule_iterations: must be at least 1")
    if not recipe.rewards:
        problems.append("rewards: at least one [[rewards]] component is required")
    if recipe.rewards and not any(r.weight != 0 for r in recipe.rewards):
        problems.append("rewards: every weight is 0; at least one must be non-zero")
    for i, r in enumerate(recipe.rewards):
        if not math.isfinite(r.weight):
            problems.append(f"rewards[{i}].weight: must be a finite number")
    if recipe.device not in ("auto", "cpu") and not recipe.device.startswith("cuda"):
        problems.append(f"device: {recipe.device!r} is not allowed; use auto, cpu, cuda or cuda:N")


def validate(raw: dict, source: str = "<memory>") -> LoadedRecipe:
    """Validate a recipe table and every plug-in's options; raise :class:`ConfigError`
    listing every problem at once."""
    from mdmrl.plugins import get_registry

    problems: list[str] = []
    recipe = opts.build(Recipe, raw, "", problems)
    if recipe is not None:
        _semantic_checks(recipe, problems)
    part_options: dict[str, Any] = {}
    registry = get_registry()
    for path, kind, name, table in _part_specs(raw):
        if not isinstance(name, str):
            continue  # reported by the schema above
        try:
            reg = registry.get(kind, name)
        except PluginLookupError as exc:
            problems.append(f"{path}.name: {exc}")
            continue
        if path == "eval.reference" and (
            getattr(reg.cls, "stochastic", False) or getattr(reg.cls, "needs_features", False)
        ):
            problems.append(
                f"eval.reference.name: {name!r} is a learned schedule; the reference must be a fixed one"
            )
            continue
        if table is not None and not isinstance(table, dict):
            continue  # reported by the schema above
        built = opts.build(reg.cls.Options, table or {}, f"{path}.options", problems)
        part_options[path] = built
    if problems:
        raise ConfigError(problems, source=source)
    return LoadedRecipe(recipe=recipe, part_options=part_options, source=source, raw=raw)


def load(path: str | Path, overrides: list[str] | None = None) -> LoadedRecipe:
    """Read, override and validate a recipe file."""
    raw = read_toml(path)
    raw = apply_overrides(raw, overrides or [])
    return validate(raw, source=str(path))


def dump_toml(data: Any, prefix: str = "") -> str:
    """Write a plain dict as TOML (enough for resolved recipes: tables, arrays of
    tables, scalars and arrays of scalars)."""
    lines: list[str] = []
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict) and not _is_table_list(v)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    table_lists = {k: v for k, v in data.items() if _is_table_list(v)}
    for k, v in scalars.items():
        lines.append(f"{_key(k)} = {_value(v)}")
    for k, v in tables.items():
        name = f"{prefix}{_key(k)}"
        body = dump_toml(v, name + ".")
        lines.append("")
        lines.append(f"[{name}]")
        if body.strip():
            lines.append(body.rstrip("\n"))
    for k, items in table_lists.items():
        name = f"{prefix}{_key(k)}"
        for item in items:
            lines.append("")
            lines.append(f"[[{name}]]")
            body = dump_toml(item, name + ".")
            if body.strip():
                lines.append(body.rstrip("\n"))
    return "\n".join(lines).lstrip("\n") + "\n"


def _is_table_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else f'"{k}"'


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def resolved_dict(loaded: LoadedRecipe) -> dict:
    """The recipe with every default filled in, plug-in options included."""
    data = opts.to_dict(loaded.recipe)
    for path, o in loaded.part_options.items():
        if o is None:
            continue
        od = opts.to_dict(o)
        if path.startswith("rewards["):
            data["rewards"][int(path[8:-1])]["options"] = od
        elif path.startswith("prompts."):
            data["prompts"][path.split(".")[1]]["options"] = od
        elif path == "eval.reference":
            data["eval"]["reference"]["options"] = od
        else:
            data[path]["options"] = od
    return data
