"""The learned schedule policy of Co-GRPO: a Gaussian over the schedule action (Eq. 14).

    pi_schedule,t = N(eta_phi(s_t), sigma^2 I)

The Gaussian lives on an *unconstrained* ("raw") vector u in R^K; the action the
sampler uses is ``to_valid(u)`` (see :data:`ACTION_MAPS`):

    temperature        tau_s = exp(u)      (> 0)
    remask_ratio       r     = sigmoid(u)  (in (0, 1); the sampler clamps it so that
                                            decoding stays monotone)
    remask_temperature tau_r = exp(u)      (> 0)
    cfg_scale          s     = exp(u)      (> 0)

The mean is the base fixed schedule mapped to raw units plus a learned offset,

    eta_phi(s_t) = to_raw(base(t, T)) + Delta_phi(features(V^(t)), (t + 1) / T),

and the last layer of Delta_phi starts at zero, so the untrained policy's mean *is*
the base schedule. Delta_phi is the network of Appendix A: a depthwise 3x3
convolution and a pointwise convolution over the backbone's final-layer token
features laid out on the H x W token grid, a LayerNorm whose scale and shift come
from the step position (AdaLN), a mean pool over the grid, and an MLP.

Only the components listed in ``trainable`` are sampled; the others follow the base
schedule exactly and add nothing to the log-prob (Table 5a's ablation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from mdmrl.errors import PluginLookupError, UserError
from mdmrl.interfaces import Backbone, BuildContext, SchedulePolicy
from mdmrl.options import plugin_name, plugin_options
from mdmrl.recipe import fixed_schedule
from mdmrl.trajectory import ACTION_FIELDS, NUM_ACTIONS

#: Smallest distance kept from the edge of a component's valid range when a base
#: action is mapped to raw units (log(0) and logit(0 or 1) are infinite).
EDGE_EPS = 1e-6

#: The map from raw to valid units, per component in :data:`ACTION_FIELDS` order.
ACTION_MAPS: dict[str, str] = {
    "temperature": "exp",
    "remask_ratio": "sigmoid",
    "remask_temperature": "exp",
    "cfg_scale": "exp",
}

#: Width of the sinusoidal embedding of the step position fed to AdaLN.
TIME_DIM = 32


def to_valid(raw: torch.Tensor) -> torch.Tensor:
    """Raw (unconstrained) actions float [..., K] -> valid actions float [..., K]."""
    cols = []
    for k, name in enumerate(ACTION_FIELDS):
        u = raw[..., k]
        cols.append(torch.sigmoid(u) if ACTION_MAPS[name] == "sigmoid" else torch.exp(u))
    return torch.stack(cols, dim=-1)


def to_raw(actions: torch.Tensor) -> torch.Tensor:
    """Valid actions float [..., K] -> raw float [..., K], the inverse of :func:`to_valid`.

    Values at (or past) the edge of the valid range are first moved EDGE_EPS inside
    it: a ratio of 0 maps to logit(1e-6), a temperature of 0 to log(1e-6).
    """
    cols = []
    for k, name in enumerate(ACTION_FIELDS):
        a = actions[..., k]
        if ACTION_MAPS[name] == "sigmoid":
            cols.append(torch.logit(a.clamp(EDGE_EPS, 1.0 - EDGE_EPS)))
        else:
            cols.append(torch.log(a.clamp_min(EDGE_EPS)))
    return torch.stack(cols, dim=-1)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """Element-wise log N(x; mean, sigma^2): float [...] -> float [...]."""
    return -((x - mean) ** 2) / (2.0 * sigma * sigma) - math.log(sigma) - 0.5 * math.log(2.0 * math.pi)


def step_embedding(progress: torch.Tensor, dim: int = TIME_DIM) -> torch.Tensor:
    """Sinusoidal features of the step position float [B] in (0, 1] -> [B, dim].

    The position is (t + 1) / T, so a policy trained with T steps can be queried at any
    other T' (the schedule is interpolated, Table 5b)."""
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, device=progress.device, dtype=torch.float32) * (-math.log(1000.0) / half)
    )
    ang = progress.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)


def policy_param_count(feature_dim: int, hidden: int, outputs: int) -> int:
    """Number of parameters of :class:`ScheduleNet` (used to size it)."""
    d, h = feature_dim, hidden
    depthwise = d * 9 + d
    pointwise = d * h + h
    adaln = TIME_DIM * 2 * h + 2 * h
    mlp = h * h + h + h * outputs + outputs
    return depthwise + pointwise + adaln + mlp


def auto_hidden(feature_dim: int, outputs: int, budget: int, lo: int = 8, hi: int = 4096) -> int:
    """The largest hidden width in [lo, hi] whose :func:`policy_param_count` fits
    ``budget`` (``lo`` when even that does not fit)."""
    best = lo
    for h in range(lo, hi + 1):
        if policy_param_count(feature_dim, h, outputs) > budget:
            break
        best = h
    return best


class ScheduleNet(nn.Module):
    """Delta_phi: token features [B, N, D] on an H x W grid and the step position
    [B] -> offset of the raw mean for the trainable components [B, K_train] (Appendix A).

    depthwise conv 3x3 (D -> D) -> pointwise conv 1x1 (D -> h) -> per-token LayerNorm
    modulated by AdaLN(step) -> SiLU -> mean over the grid -> Linear(h, h) -> SiLU ->
    Linear(h, K_train), the last layer zero-initialised.
    """

    def __init__(self, feature_dim: int, grid_shape: tuple[int, int], hidden: int, outputs: int):
        super().__init__()
        self.grid_shape = tuple(grid_shape)
        self.depthwise = nn.Conv2d(feature_dim, feature_dim, 3, padding=1, groups=feature_dim)
        self.pointwise = nn.Conv2d(feature_dim, hidden, 1)
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.adaln = nn.Linear(TIME_DIM, 2 * hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, outputs)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, features: torch.Tensor, progress: torch.Tensor) -> torch.Tensor:
        b, n, d = features.shape
        h, w = self.grid_shape
        if n != h * w:
            raise ValueError(f"features have {n} tokens; the policy was built for a {h}x{w} grid")
        x = features.to(self.pointwise.weight.dtype).transpose(1, 2).reshape(b, d, h, w)
        x = self.pointwise(self.depthwise(x))  # [B, h, H, W]
        x = x.flatten(2).transpose(1, 2)  # [B, N, h]
        scale, shift = self.adaln(step_embedding(progress)).chunk(2, dim=-1)  # [B, h] each
        x = self.norm(x) * (1.0 + scale[:, None]) + shift[:, None]
        x = nn.functional.silu(x).mean(dim=1)  # [B, h]
        return self.fc2(nn.functional.silu(self.fc1(x)))


@dataclass
class GaussianOptions:
    """Options of the ``gaussian`` schedule policy."""

    base: str = plugin_name(
        "schedule",
        "meissonic",
        doc="fixed schedule the untrained mean reproduces (any registered fixed schedule)",
        accept=fixed_schedule,
    )
    base_options: dict = plugin_options(
        "base", doc="options of the base schedule, validated by its own schema (e.g. { cfg_scale = 3.0 })"
    )
    sigma: float = field(
        default=0.1,
        metadata={
            "doc": "standard deviation of every sampled raw component (covariance sigma^2 I)",
            "min_exclusive": 0.0,
        },
    )
    trainable: list[str] = field(
        default_factory=lambda: list(ACTION_FIELDS),
        metadata={
            "doc": "action components the policy samples and learns; the others follow the base "
            "schedule exactly",
            "choices": list(ACTION_FIELDS),
        },
    )
    hidden: int | None = field(
        default=None,
        metadata={
            "doc": "hidden width of the policy network; unset = the largest width whose parameter "
            "count stays within size_fraction of the backbone's",
            "min": 1,
        },
    )
    size_fraction: float = field(
        default=0.01,
        metadata={
            "doc": "parameter budget relative to the backbone when hidden is unset",
            "min_exclusive": 0.0,
        },
    )


class GaussianSchedule(SchedulePolicy):
    """Co-GRPO's learned schedule: pi_schedule,t = N(eta_phi(s_t), sigma^2 I) over raw actions (Eq. 14).

    See the module docstring for the raw -> valid map and the network."""

    name = "gaussian"
    Options = GaussianOptions
    stochastic = True
    needs_features = True

    def __init__(
        self,
        options: GaussianOptions,
        feature_dim: int,
        grid_shape: tuple[int, int],
        base: SchedulePolicy,
        hidden: int,
    ):
        super().__init__()
        if options.sigma <= 0:
            raise UserError(f"schedule.options.sigma: {options.sigma} must be greater than 0")
        trainable = [f for f in ACTION_FIELDS if f in set(options.trainable)]
        unknown = [f for f in options.trainable if f not in ACTION_FIELDS]
        if unknown:
            raise UserError(
                f"schedule.options.trainable: unknown component(s) {unknown}; choose from {list(ACTION_FIELDS)}"
            )
        if not trainable:
            raise UserError(
                "schedule.options.trainable: empty; list at least one of "
                f"{list(ACTION_FIELDS)} or use the fixed schedule {options.base!r} itself"
            )
        if base.stochastic or base.needs_features:
            raise UserError(
                f"schedule.options.base: {base.name!r} is a learned schedule; the base must be a fixed one"
            )
        self.options = options
        self.sigma = float(options.sigma)
        self.trainable = trainable
        idx = [ACTION_FIELDS.index(f) for f in trainable]
        self.register_buffer("train_index", torch.tensor(idx, dtype=torch.long), persistent=False)
        mask = torch.zeros(NUM_ACTIONS, dtype=torch.bool)
        mask[idx] = True
        self.register_buffer("train_mask", mask, persistent=False)
        self.feature_dim = int(feature_dim)
        self.grid_shape = (int(grid_shape[0]), int(grid_shape[1]))
        self.hidden = int(hidden)
        self.net = ScheduleNet(self.feature_dim, self.grid_shape, self.hidden, len(trainable))
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_options(cls, options: GaussianOptions, ctx: BuildContext) -> GaussianSchedule:
        backbone = ctx.backbone
        if backbone is None:
            raise UserError("schedule: the gaussian schedule needs the backbone to be built first")
        base = build_base_schedule(options.base, ctx, options.base_options)
        n_train = len({f for f in options.trainable if f in ACTION_FIELDS})
        hidden = options.hidden
        if hidden is None:
            budget = int(options.size_fraction * count_parameters(backbone))
            hidden = auto_hidden(backbone.feature_dim, max(n_train, 1), budget)
        return cls(options, backbone.feature_dim, backbone.grid_shape, base, hidden)

    # ------------------------------------------------------------------ the policy

    def entropy(self) -> float:
        """Differential entropy of pi_schedule,t in nats (constant: sigma is fixed)."""
        return len(self.trainable) * (0.5 * math.log(2.0 * math.pi * math.e) + math.log(self.sigma))

    def guidance_free(self, step: int, num_steps: int) -> bool:
        """True when the CFG scale is not learned and the base schedule's is exactly 1."""
        return "cfg_scale" not in self.trainable and self.base.guidance_free(step, num_steps)

    def base_actions(self, step: int, num_steps: int, batch_size: int, device: torch.device) -> torch.Tensor:
        """The base schedule's action at ``step`` in valid units, float32 [B, K]."""
        with torch.no_grad():
            acts, _, _ = self.base.act(step, num_steps, 1, None, None, deterministic=True)
        return acts.to(device=device, dtype=torch.float32).reshape(1, NUM_ACTIONS).expand(batch_size, -1)

    def mean(self, step: int, num_steps: int, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """eta_phi(s_t) in raw units and the base action in valid units, both float32 [B, K].

        features: float [B, N, D]. Components not trainable have the base's raw value
        and no dependence on phi."""
        if features is None:
            raise ValueError("the gaussian schedule needs the backbone's features (needs_features = True)")
        b = features.shape[0]
        device = self.train_mask.device
        base = self.base_actions(step, num_steps, b, device)
        progress = torch.full((b,), (step + 1) / num_steps, device=device)
        delta = self.net(features.detach().to(device), progress).float()  # [B, K_train]
        full = torch.zeros(b, NUM_ACTIONS, device=device, dtype=torch.float32)
        full = full.index_copy(1, self.train_index, delta)
        return to_raw(base) + full, base

    def act(
        self,
        step: int,
        num_steps: int,
        batch_size: int,
        features: torch.Tensor | None,
        generator: torch.Generator | None,
        deterministic: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample A_t (or take the mean when ``deterministic``).

        Noise: one standard normal draw of shape [B, K] from ``generator`` (on the
        generator's device), of which only the trainable columns are used. Returns
        (actions [B, K] valid units, raw [B, K], log_prob [B]), float32. Columns not
        trainable hold the base action exactly (actions) and its raw image (raw)."""
        if features is None:
            raise ValueError("the gaussian schedule needs the backbone's features (needs_features = True)")
        if features.shape[0] != batch_size:
            raise ValueError(f"features have batch {features.shape[0]}, expected {batch_size}")
        mean, base = self.mean(step, num_steps, features)
        mean = mean.detach()
        if deterministic:
            raw = mean
        else:
            gen_device = generator.device if generator is not None else mean.device
            noise = torch.randn(batch_size, NUM_ACTIONS, generator=generator, device=gen_device)
            raw = torch.where(self.train_mask, mean + self.sigma * noise.to(mean.device), mean)
        actions = torch.where(self.train_mask, to_valid(raw), base)
        logp = gaussian_log_prob(raw[:, self.train_index], mean[:, self.train_index], self.sigma).sum(-1)
        return actions, raw, logp

    def log_prob(
        self, step: int, num_steps: int, features: torch.Tensor | None, raw_actions: torch.Tensor
    ) -> torch.Tensor:
        """log pi_schedule,t(raw) summed over the trainable components, float32 [B]
        (Eq. 14/20), differentiable in phi. raw_actions: float [B, K]."""
        mean, _ = self.mean(step, num_steps, features)
        raw = raw_actions.to(mean.device, torch.float32)
        return gaussian_log_prob(raw[:, self.train_index], mean[:, self.train_index], self.sigma).sum(-1)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module`` (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def build_base_schedule(name: str, ctx: BuildContext, table: dict | None = None) -> SchedulePolicy:
    """Build the fixed schedule ``name`` via the registry, with ``table`` validated by its
    own options schema (defaults when empty)."""
    from mdmrl import options as option_schema
    from mdmrl.errors import ConfigError
    from mdmrl.plugins import get_registry

    try:
        reg = get_registry().get("schedule", name)
    except PluginLookupError as exc:
        raise UserError(f"schedule.options.base: {exc}") from None
    cls = reg.cls
    if getattr(cls, "stochastic", False) or getattr(cls, "needs_features", False):
        raise UserError(
            f"schedule.options.base: {name!r} is a learned schedule; the base must be a fixed one"
        )
    problems: list[str] = []
    opts = option_schema.build(cls.Options, table or {}, "schedule.options.base_options", problems)
    if problems:
        raise ConfigError(problems, source="schedule.options.base_options")
    return cls.from_options(opts, ctx)


def size_report(backbone: Backbone, policy: GaussianSchedule) -> dict[str, float]:
    """Parameter counts of the backbone and the policy network, and their ratio."""
    nb, npol = count_parameters(backbone), count_parameters(policy.net)
    return {"backbone_params": nb, "policy_params": npol, "ratio": npol / max(nb, 1)}
