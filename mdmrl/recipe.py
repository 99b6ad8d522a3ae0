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
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from mdmrl import options as opts
from mdmrl.errors import ConfigError, UserError

MODES = ("naive", "schedule_only", "joint", "alternating")


def _f(default: Any = dataclasses.MISSING, doc: str = "", **meta: Any) -> Any:
    md = {"doc": doc, **meta}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=md)
    if callable(default) and not isinstance(default, (int, float, str, bool)):
        return field(default_factory=default, metadata=md)
    return field(default=default, metadata=md)


def fixed_schedule(cls: type) -> str | None:
    """``accept`` rule of a field that names a schedule: only a fixed one will do."""
    if getattr(cls, "stochastic", False) or getattr(cls, "needs_features", False):
        return "is a learned schedule; a fixed schedule is needed here"
    return None


def supports_pretraining(cls: type) -> str | None:
    """``accept`` rule of ``pretrain.backbone``: the backbone must define ``PretrainOptions``."""
    return None if hasattr(cls, "PretrainOptions") else "does not support pretraining (no PretrainOptions)"


BackboneSpec = opts.plugin_table("BackboneSpec", "backbone", "backbone")
ScheduleSpec = opts.plugin_table("ScheduleSpec", "schedule", "schedule")
ReferenceScheduleSpec = opts.plugin_table(
    "ReferenceScheduleSpec", "schedule", "fixed schedule", accept=fixed_schedule
)
ObjectiveSpec = opts.plugin_table("ObjectiveSpec", "objective", "objective")
PromptSourceSpec = opts.plugin_table("PromptSourceSpec", "prompts", "prompt source")


@dataclass
class SamplerSpec:
    """The sampler and the training step count."""

    name: str = opts.plugin_name("sampler", "confidence", doc="registered sampler name")
    steps: int = _f(16, doc="denoising steps T used for training rollouts", min=1)
    options: dict = opts.plugin_options("name", doc="sampler options, validated by its own schema")


@dataclass
class RewardSpec:
    """One reward component."""

    name: str = opts.plugin_name("rewarder", doc="registered rewarder name")
    weight: float = _f(1.0, doc="weight of this component in the total reward (negative only with penalty)")
    penalty: bool = _f(False, doc="declares a negative weight: the component is subtracted")
    options: dict = opts.plugin_options("name", doc="rewarder options, validated by its own schema")

    def check_options(self) -> list[str]:
        if self.weight < 0 and not self.penalty:
            return [f"weight: {self.weight} is negative; set penalty = true to subtract this component"]
        if self.penalty and self.weight >= 0:
            return [f"penalty: true, but weight {self.weight} is not negative; a penalty's weight is < 0"]
        return []


@dataclass
class PromptsSpec:
    train: PromptSourceSpec = _f(doc="training prompt stream")
    eval: PromptSourceSpec | None = _f(
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

    def check_options(self) -> list[str]:
        out = []
        if self.batch_size % self.group_size:
            out.append(f"batch_size: {self.batch_size} is not a multiple of group_size {self.group_size}")
        if len(self.betas) != 2:
            out.append(f"betas: expected 2 numbers, got {len(self.betas)}")
        return out


def _only_alternating(t: TrainSpec) -> str | None:
    if t.mode != "alternating":
        return (
            f'in mode "{t.mode}" (only the alternating mode has cycles; '
            "this mode runs train.iterations iterations)"
        )
    return None


def _not_alternating(t: TrainSpec) -> str | None:
    if t.mode == "alternating":
        return (
            'in mode "alternating" (the run is cycles × (model_iterations + schedule_iterations) iterations)'
        )
    return None


def _trains(phase: str) -> Callable[[TrainSpec], str | None]:
    """``no_effect`` rule of an optimizer table: the mode never trains that phase."""

    def rule(t: TrainSpec) -> str | None:
        if t.mode == ("schedule_only" if phase == "model" else "naive"):
            return f'in mode "{t.mode}" (the {phase} is not trained, so it has no optimizer)'
        return None

    return rule


@dataclass
class TrainSpec:
    mode: str = _f("alternating", doc="which parameters train, and when", choices=list(MODES))
    iterations: int = _f(
        10,
        doc="iterations for the naive, schedule_only and joint modes",
        min=1,
        no_effect=_not_alternating,
    )
    cycles: int = _f(
        1, doc="alternating mode: number of (model, schedule) cycles", min=1, no_effect=_only_alternating
    )
    model_iterations: int = _f(
        5, doc="alternating mode: N_m model iterations per cycle", min=0, no_effect=_only_alternating
    )
    schedule_iterations: int = _f(
        5, doc="alternating mode: N_s schedule iterations per cycle", min=0, no_effect=_only_alternating
    )
    schedule_first: bool = _f(
        False, doc="alternating mode: start each cycle with the schedule phase", no_effect=_only_alternating
    )
    model: OptimSpec = _f(
        OptimSpec, doc="optimizer and batch of the model (backbone) phase", no_effect=_trains("model")
    )
    schedule: OptimSpec = _f(
        lambda: OptimSpec(lr=1e-4, group_size=8),
        doc="optimizer and batch of the schedule phase",
        no_effect=_trains("schedule"),
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

    def check_options(self) -> list[str]:
        if self.mode == "alternating" and self.model_iterations + self.schedule_iterations < 1:
            return ["model_iterations + schedule_iterations: must be at least 1"]
        return []


@dataclass
class EvalSpec:
    steps: list[int] = _f([16], doc="step counts to evaluate at", min=1)
    seeds: int = _f(3, doc="samples (seeds) per prompt; the spread is over seeds", min=1)
    max_prompts: int | None = _f(None, doc="evaluate only the first N held-out prompts", min=1)
    before: bool = _f(True, doc="evaluate the untrained policies before training")
    after: bool = _f(True, doc="evaluate after training")
    deterministic_schedule: bool = _f(True, doc="use the schedule policy's mean action at evaluation")
    reference: ReferenceScheduleSpec | None = _f(
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
    tensorboard: bool = _f(
        True, doc="write TensorBoard event files (false removes tensorboard from logging.trackers)"
    )
    trackers: list[str] = _f(
        ["tensorboard"],
        doc="experiment trackers that receive every metrics row (main process only, through "
        "accelerate's tracker classes): tensorboard (tb/), wandb (Weights & Biases, the wandb "
        "extra; WANDB_MODE=offline needs no network). metrics.jsonl stays the run's record",
        choices=["tensorboard", "wandb"],
    )
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


PLACEMENTS = ("rank", "device", "process")


def _placement(*modes: str) -> Callable[[RewardPlacementSpec], str | None]:
    """``no_effect`` rule of a ``[reward_placement]`` key used by ``modes`` only."""

    def rule(p: RewardPlacementSpec) -> str | None:
        if p.mode not in modes:
            which = " and ".join(f'"{m}"' for m in modes)
            return f'in mode "{p.mode}" (read in mode {which} only)'
        return None

    return rule


@dataclass
class RewardPlacementSpec:
    """Where the reward models run (docs/rewards.md, "Where reward models run")."""

    mode: str = _f(
        "rank",
        doc="rank: every process builds the rewarders on its own device; device: only the main "
        "process builds them, on `device`, and scores every process's samples (gathered through "
        "the process group); process: one reward process builds them and every process sends it "
        "its samples over TCP",
        choices=list(PLACEMENTS),
    )
    device: str | None = _f(
        None,
        doc="auto, cpu, cuda or cuda:N. Mode device: where the main process puts the rewarders "
        "(default: its training device). Mode process: the reward process's device (default: the "
        "recipe's device). A reward's own `device` option still wins",
        no_effect=_placement("device", "process"),
    )
    address: str | None = _f(
        None,
        doc="mode process: HOST:PORT of a reward process started with `mdmrl reward-server RECIPE "
        "--port PORT`; when left out, the main process starts one on 127.0.0.1 (a free port) and "
        "stops it when the run ends",
        no_effect=_placement("process"),
    )
    timeout_s: float = _f(
        600.0,
        doc="mode process: seconds one request (or the start of the run's own reward process) may "
        "take before the run stops with an error; the first request also loads the reward models",
        min_exclusive=0.0,
        no_effect=_placement("process"),
    )

    def check_options(self) -> list[str]:
        out = []
        if self.device is not None and self.device not in ("auto", "cpu") and not _is_cuda(self.device):
            out.append(f"device: {self.device!r} is not allowed; use auto, cpu, cuda or cuda:N")
        if self.address is not None:
            host, _, port = self.address.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                out.append(
                    f"address: {self.address!r} is not HOST:PORT with a port in 1..65535, "
                    'e.g. "127.0.0.1:5701"'
                )
        return out


def _is_cuda(name: str) -> bool:
    return name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())


@dataclass
class Recipe:
    """A training recipe (`mdmrl run`; also read by `mdmrl eval` and `mdmrl sample`)."""

    backbone: BackboneSpec = _f(doc="the masked diffusion model")
    schedule: ScheduleSpec = _f(doc="fixed schedule or learned schedule policy")
    rewards: list[RewardSpec] = _f(doc="reward components, summed with their weights")
    objective: ObjectiveSpec = _f(doc="the policy-gradient objective")
    prompts: PromptsSpec = _f(doc="where prompts come from")
    sampler: SamplerSpec = _f(SamplerSpec, doc="the sampler and the training step count")
    seed: int = _f(0, doc="seed of every random stream of the run", min=0)
    description: str = _f("", doc="free text shown by `mdmrl validate`")
    device: str = _f("auto", doc="auto, cpu, cuda or cuda:N")
    train: TrainSpec = _f(TrainSpec, doc="the training engine")
    eval: EvalSpec = _f(EvalSpec, doc="held-out evaluation")
    logging: LoggingSpec = _f(LoggingSpec, doc="checkpoints, images, logs")
    reward_placement: RewardPlacementSpec = _f(
        RewardPlacementSpec,
        doc="where the reward models run: on every process, on one device of the main process, "
        "or in a reward process",
    )

    def check_options(self) -> list[str]:
        out = []
        rewards = [r for r in self.rewards if r is not None]
        if not self.rewards:
            out.append("rewards: at least one [[rewards]] component is required")
        elif rewards and not any(r.weight != 0 for r in rewards):
            out.append("rewards: every weight is 0; at least one must be non-zero")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            out.append(f"device: {self.device!r} is not allowed; use auto, cpu, cuda or cuda:N")
        if self.train.mode != "naive" and _is_fixed_schedule(self.schedule.name):
            out.append(
                f"train.mode: {self.train.mode!r} trains the schedule, but schedule "
                f'{self.schedule.name!r} is a fixed one with nothing to train; use mode = "naive" '
                'or a learned schedule such as "gaussian"'
            )
        return out


def _is_fixed_schedule(name: str) -> bool:
    from mdmrl.plugins import get_registry

    found = get_registry().parts["schedule"].get(name)
    return found is not None and fixed_schedule(found.cls) is None


@dataclass
class PretrainSpec:
    backbone: str = opts.plugin_name(
        "backbone",
        doc="registered backbone name (one that supports pretraining)",
        accept=supports_pretraining,
    )
    output: str = _f(doc="path of the .safetensors file to write")
    options: dict = opts.plugin_options(
        "backbone", doc="the backbone's PretrainOptions", attribute="PretrainOptions"
    )


@dataclass
class PretrainRecipe:
    """A pretraining recipe (`mdmrl pretrain`): a table `[pretrain]` and nothing else."""

    pretrain: PretrainSpec = _f(doc="what to pretrain and where to write it")


def plan_summary(t: TrainSpec) -> str:
    """The run's plan in one line, e.g. "72 iterations: 3 cycles x (16 model + 8 schedule)"."""
    if t.mode == "alternating":
        phases = [f"{t.model_iterations} model", f"{t.schedule_iterations} schedule"]
        if t.schedule_first:
            phases.reverse()
        total = t.cycles * (t.model_iterations + t.schedule_iterations)
        return f"{total} iterations: {t.cycles} cycles × ({' + '.join(phases)})"
    what = {"naive": "model only", "schedule_only": "schedule only", "joint": "model and schedule together"}
    return f"{t.iterations} iterations: {t.mode} mode ({what[t.mode]})"


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


# -- loading ----------------------------------------------------------------------------------
def read_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: recipe file not found")
    if p.is_dir():
        raise UserError(f"{p}: is a directory, expected a .toml recipe file")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{p}: not a UTF-8 text file (invalid byte at line {line})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{p}: TOML syntax error: {exc}{_quote_line(text, str(exc))}") from None


def _quote_line(text: str, message: str) -> str:
    """The line a TOML error points at, quoted (it names the key or table)."""
    found = re.search(r"at line (\d+)", message)
    lines = text.splitlines()
    if not found or not 1 <= int(found.group(1)) <= len(lines):
        return ""
    line = lines[int(found.group(1)) - 1].strip()
    return f": {line[:80]!r}" if line else ""


def is_pretrain(raw: dict) -> bool:
    """A recipe with a top-level ``[pretrain]`` table is a pretraining recipe."""
    return "pretrain" in raw


def _build(cls: type, raw: dict, source: str) -> tuple[Any, dict[str, Any]]:
    """Build ``cls`` from ``raw``; raise :class:`ConfigError` listing every problem.
    Returns the instance and the built options of each part, by the part's path."""
    problems: list[str] = []
    built: dict[str, Any] = {}
    instance = opts.build(cls, raw, "", problems, built)
    if problems:
        raise ConfigError(problems, source=source)
    parts = {path[: -len(".options")]: o for path, o in built.items() if path.endswith(".options")}
    return instance, parts


def validate(raw: dict, source: str = "<memory>") -> LoadedRecipe:
    """Validate a training recipe and every plug-in's options, at every depth; raise
    :class:`ConfigError` listing every problem at once."""
    if not raw:
        raise UserError(
            f"{source}: empty recipe; a training recipe needs [backbone], [schedule], [[rewards]], "
            "[objective] and [prompts.train], a pretraining recipe needs [pretrain]"
        )
    recipe, parts = _build(Recipe, raw, source)
    return LoadedRecipe(recipe=recipe, part_options=parts, source=source, raw=raw)


def validate_pretrain(raw: dict, source: str = "<memory>") -> tuple[PretrainSpec, Any]:
    """Validate a pretraining recipe; returns its spec and the backbone's built
    ``PretrainOptions``."""
    recipe, parts = _build(PretrainRecipe, raw, source)
    return recipe.pretrain, parts["pretrain"]


def drop_ineffective(raw: dict) -> dict:
    """A copy of a training recipe without the keys that have no effect in it (a run
    directory written by an earlier version may hold some)."""
    import copy

    data = copy.deepcopy(raw)
    for path in opts.ineffective(Recipe, raw):
        *parents, last = _segments(path)
        node: Any = data
        for k in parents:
            node = node[k]
        del node[last]
    return data


def _segments(path: str) -> list[str | int]:
    """ "rewards[0].options" -> ["rewards", 0, "options"]."""
    out: list[str | int] = []
    for part in path.split("."):
        name, *indices = part.replace("]", "").split("[")
        out.append(name)
        out += [int(i) for i in indices]
    return out


def effective_overrides(raw: dict, overrides: list[str]) -> list[str]:
    """The ``overrides`` that have an effect on ``raw`` once all are applied (for
    scripts that size several recipes of different modes with one list)."""
    ignored = opts.ineffective(Recipe, apply_overrides(raw, overrides))

    def path(text: str) -> str:
        keys = parse_override(text)[0]
        return "".join(f"[{k}]" if k.isdigit() else f".{k}" for k in keys).lstrip(".")

    return [o for o in overrides if not any(path(o) == p or path(o).startswith(p + ".") for p in ignored)]


def load(path: str | Path, overrides: list[str] | None = None, run_dir: bool = False) -> LoadedRecipe:
    """Read, override and validate a training recipe file. ``run_dir``: the file is a
    run directory's resolved recipe, whose keys without effect (written by earlier
    versions) are dropped instead of refused."""
    raw = apply_overrides(read_toml(path), overrides or [])
    if is_pretrain(raw) and not run_dir:
        raise UserError(f"{path}: a pretraining recipe ([pretrain]); run it with: mdmrl pretrain {path}")
    return validate(drop_ineffective(raw) if run_dir else raw, source=str(path))


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


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}


def _basic_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and every control character escaped."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return repr(v)
    if isinstance(v, str):
        return _basic_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def resolved_dict(loaded: LoadedRecipe, effective: bool = False) -> dict:
    """The recipe with every default filled in, plug-in options included. With
    ``effective``, keys without effect in it are left out (so that it validates again)."""
    data = opts.to_dict(loaded.recipe, effective)
    for path, o in loaded.part_options.items():
        if o is None:
            continue
        *parents, last = _segments(path)
        node: Any = data
        for k in parents:
            node = node[k]
        if last in node:
            node[last]["options"] = opts.to_dict(o, effective)
    return data
