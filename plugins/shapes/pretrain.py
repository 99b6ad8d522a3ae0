"""Masked-token pretraining of ``shapes-mdm`` on the world's training pairs.

The objective is the BERT/MaskGIT one: for every sample draw u ~ U(0, 1), mask
ratio r = cos(pi/2 * u), mask ceil(r * N) positions (at least 1) chosen uniformly,
and take the cross-entropy of the original tokens at the masked positions only
(mean over all masked positions of the batch). The model sees the masked fraction
k / N as its timestep. With probability ``null_prompt_prob`` a prompt is replaced by
"" so that the model also learns the unconditional distribution needed for CFG.

Pairs come from ``world.sample_pair(rng, "train")`` generated on the fly. Everything
random is seeded from ``PretrainOptions.seed``: a numpy Generator for the data, the
mask ratios, the mask positions and the null-prompt draws, and torch's global seed for
the initialisation. The optimizer is AdamW (weight decay on matrices only) with a
linear warm-up and cosine decay to zero, and global gradient-norm clipping.

Command: ``mdmrl pretrain recipes/shapes/pretrain.toml``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mdmrl.errors import UserError
from mdmrl_plugins.shapes.model import PretrainOptions, ShapesMDM, ShapesMDMConfig, world_config

SamplePair = Callable[[np.random.Generator], tuple[str, np.ndarray]]
Progress = Callable[[int, dict[str, float]], None]


def _world_sample_pair(rng: np.random.Generator) -> tuple[str, np.ndarray]:
    from mdmrl_plugins.shapes import world

    return world.sample_pair(rng, "train")


def cosine_mask(rng: np.random.Generator, batch: int, n: int) -> np.ndarray:
    """Per-sample masks bool [B, N]: ratio r = cos(pi/2 * u), u ~ U(0, 1); exactly
    max(1, ceil(r * N)) positions masked, chosen uniformly without replacement."""
    u = rng.random(batch)
    k = np.maximum(1, np.ceil(np.cos(0.5 * np.pi * u) * n)).astype(np.int64)
    ranks = np.argsort(np.argsort(rng.random((batch, n)), axis=1), axis=1)
    return ranks < k[:, None]


def make_batch(
    rng: np.random.Generator,
    batch: int,
    n: int,
    mask_id: int,
    null_prompt_prob: float,
    sample_pair: SamplePair,
) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training batch: (prompts, targets long [B, N], inputs long [B, N] with the
    mask id at masked positions, mask bool [B, N], timestep float32 [B] = masked fraction)."""
    prompts, grids = [], []
    for _ in range(batch):
        prompt, grid = sample_pair(rng)
        prompts.append(prompt)
        grids.append(np.asarray(grid, dtype=np.int64).reshape(-1))
    drop = rng.random(batch) < null_prompt_prob
    prompts = ["" if d else p for p, d in zip(prompts, drop)]
    targets = torch.from_numpy(np.stack(grids))
    mask = torch.from_numpy(cosine_mask(rng, batch, n))
    inputs = targets.masked_fill(mask, mask_id)
    timestep = mask.float().mean(1)
    return prompts, targets, inputs, mask, timestep


def masked_loss(model: ShapesMDM, prompts, targets, inputs, mask, timestep) -> torch.Tensor:
    """Mean cross-entropy of ``targets`` over the masked positions (scalar)."""
    out = model(inputs, model.encode_prompts(prompts), timestep)
    return F.cross_entropy(out.logits[mask], targets[mask])


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


def pretrain(
    options: PretrainOptions,
    output: str,
    progress: Progress | None = None,
    *,
    sample_pair: SamplePair | None = None,
    config: ShapesMDMConfig | None = None,
) -> dict[str, Any]:
    """Train a fresh ``shapes-mdm`` and write ``output`` (.safetensors) + its .json.

    sample_pair: ``rng -> (prompt, grid [H, W])``; defaults to the world's "train"
        split. config: the architecture; defaults to the options' fields with the
        world's vocabulary and palette.
    progress: called as ``progress(step, {"loss": ..., "lr": ...})`` every
        ``options.log_every`` steps and after the last one (loss = mean since the
        previous report).
    Returns the summary written to the JSON file: the options, parameter count,
    ``first_loss`` / ``final_loss`` (mean of the first / last min(50, steps/10) steps),
    wall time and ``loss_curve`` ([step, mean loss] at every report).
    """
    start = time.perf_counter()
    if options.threads > 0:
        torch.set_num_threads(options.threads)
    sample_pair = sample_pair or _world_sample_pair
    if config is None:
        config = world_config(options)
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    model = ShapesMDM(config)
    model.train()

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": options.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=options.lr,
        betas=(0.9, 0.99),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, options.steps, options.warmup))

    n = model.num_tokens
    losses: list[float] = []
    window: list[float] = []
    curve: list[list[float]] = []
    state_path = partial_path(output)
    first = 1
    if state_path.exists():
        first, losses, window, curve, earlier = _restore(state_path, options, model, opt, sched, rng)
        start -= earlier
        print(f"resuming pretraining at step {first} from {state_path}", file=sys.stderr)
    interval = options.checkpoint_minutes * 60.0
    last_save = time.perf_counter()
    for step in range(first, options.steps + 1):
        batch = make_batch(
            rng, options.batch_size, n, model.mask_token_id, options.null_prompt_prob, sample_pair
        )
        loss = masked_loss(model, *batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
        opt.step()
        sched.step()
        value = float(loss.detach())
        losses.append(value)
        window.append(value)
        if step % options.log_every == 0 or step == options.steps:
            mean = sum(window) / len(window)
            curve.append([step, round(mean, 5)])
            if progress is not None:
                progress(step, {"loss": mean, "lr": opt.param_groups[0]["lr"]})
            window = []
        if interval > 0 and step < options.steps and time.perf_counter() - last_save >= interval:
            elapsed = time.perf_counter() - start
            _checkpoint(state_path, step, elapsed, options, model, opt, sched, rng, losses, window, curve)
            last_save = time.perf_counter()

    tail = losses[-max(1, min(50, len(losses) // 10)) :]
    head = losses[: max(1, min(50, len(losses) // 10))]
    summary = {
        "pretrain": asdict(options),
        "parameters": sum(p.numel() for p in model.parameters()),
        "first_loss": sum(head) / len(head),
        "final_loss": sum(tail) / len(tail),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "torch_version": torch.__version__,
        "loss_curve": curve,
    }
    model.eval()
    model.save(output, extra=summary)
    plot_loss(curve, loss_plot_path(output))
    state_path.unlink(missing_ok=True)
    return summary


def partial_path(output: str) -> Path:
    """Where an unfinished run keeps its resumable state: ``<output>.partial.pt``."""
    return Path(output).with_name(Path(output).name + ".partial.pt")


def loss_plot_path(output: str) -> Path:
    """The pretraining loss plot written beside the weights: ``<stem>-loss.png``."""
    p = Path(output)
    return p.with_name(p.stem + "-loss.png")


#: Options that change how a run is watched, not what it computes: a resumed run may differ in them.
_RUN_ONLY = frozenset({"threads", "checkpoint_minutes", "log_every"})


def _checkpoint(path: Path, step, elapsed, options, model, opt, sched, rng, losses, window, curve) -> None:
    """Write everything the loop reads (weights, optimizer, LR schedule, data rng, loss
    history) so that a restarted run continues bit for bit; atomic (temp file + rename)."""
    state = {
        "step": step,
        "elapsed_s": elapsed,
        "options": asdict(options),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": json.dumps(rng.bit_generator.state),
        "losses": losses,
        "window": window,
        "curve": curve,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _restore(path: Path, options, model, opt, sched, rng):
    """Load a checkpoint of :func:`_checkpoint`; returns (next step, losses, window, curve,
    seconds spent before it)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise UserError(
            f"{path}: unreadable pretraining checkpoint ({exc}); delete it to start over"
        ) from None
    saved = state.get("options", {})
    changed = sorted(
        k for k, v in asdict(options).items() if k not in _RUN_ONLY and (k not in saved or saved[k] != v)
    )
    if changed:
        raise UserError(
            f"{path}: a partial pretraining with other options ({', '.join(changed)}); "
            "restore those options to continue it, or delete the file to start over"
        )
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    rng.bit_generator.state = json.loads(state["rng"])
    curve = [list(c) for c in state["curve"]]
    return state["step"] + 1, list(state["losses"]), list(state["window"]), curve, float(state["elapsed_s"])


def plot_loss(curve: list[list[float]], path: Path) -> None:
    """PNG of the masked loss against the step (log scale on the loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([c[0] for c in curve], [c[1] for c in curve])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("masked cross-entropy (nats)")
    ax.set_title("shapes-mdm pretraining")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
