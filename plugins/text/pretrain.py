"""Pretraining of the embedded text world's model: a small LLaDA on worked arithmetic.

``mdmrl pretrain recipes/text/pretrain.toml`` trains a fresh :class:`LLaDAModel` (the
``llada`` backbone's network, the published key layout) with a char-level tokenizer
(:func:`arith_tokenizer`) on the training problems of :mod:`mdmrl_plugins.text.arith`,
and writes a complete checkpoint folder that the ``llada`` backbone loads like any
downloaded one (``chat_template = false``: the prompt is BOS and the problem itself).

Objective (LLaDA's supervised one, weighted per sample): the prompt is never masked;
the completion (the worked solution, its end-of-sequence token and the end-of-sequence
padding up to ``gen_length``) is masked, and a sample's loss is the mean cross-entropy of
the original tokens over its loss positions; the batch's loss is the mean over samples
(every sample weighs the same, whatever its number of masked positions: LLaDA's 1 / t
weighting, which gives the few-mask samples, where an operand is to be copied or a
step's result computed from a visible left side, as much weight as the many-mask ones).
Per sample the mask is, with probability ``block_mask_prob``, in the shape the block
sampler meets: a block b drawn uniformly among the blocks that hold the solution or its
end-of-sequence token, the blocks before it clear, the blocks after it masked, and k ~
U{1..block_length} random positions of block b masked; the loss positions are those k
(the sampler reads the predictions of the active block only). Otherwise the mask is
LLaDA's (k ~ U{1..N} positions chosen uniformly), and every masked position is a loss
position.

Every ``eval_every`` steps the run samples the ``eval_count`` problems of a fixed list
of held-out problems (seed ``eval_seed``) with the ``block`` sampler and the ``llada``
schedule at ``eval_temperature`` and records the fraction answered correctly
(``arith-correct``). With ``stop_accuracy`` set, training stops after the first
evaluation that reaches it: the written weights are those of that step (the base model
of the world must leave room for RL; docs/text.md).

The loop, its resumable ``<output>.partial.pt`` checkpoint and the learning-rate
schedule are those of the shapes world's pretraining (:mod:`mdmrl_plugins.shapes.pretrain`);
the evaluation records of an unfinished run are kept in ``<output>.evals.jsonl`` (a
resumed run rewrites the steps it repeats with the same values).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mdmrl_plugins.text import arith

Progress = Callable[[int, dict[str, float]], None]


@dataclass
class PretrainOptions:
    """Options of ``llada`` pretraining on the embedded arithmetic world (the
    ``[pretrain.options]`` table). The architecture fields define the network trained."""

    steps: int = field(default=4000, metadata={"doc": "most optimizer steps", "min": 1})
    batch_size: int = field(default=64, metadata={"doc": "problems per step", "min": 1})
    lr: float = field(default=5e-4, metadata={"doc": "peak AdamW learning rate", "min_exclusive": 0.0})
    weight_decay: float = field(default=0.01, metadata={"doc": "AdamW decay of matrices", "min": 0.0})
    warmup: int = field(default=100, metadata={"doc": "linear warm-up steps before cosine decay", "min": 0})
    seed: int = field(default=0, metadata={"doc": "seeds the data rng and the torch init", "min": 0})
    grad_clip: float = field(default=1.0, metadata={"doc": "max global grad norm", "min_exclusive": 0.0})
    log_every: int = field(default=25, metadata={"doc": "steps between progress reports", "min": 1})
    threads: int = field(
        default=1, metadata={"doc": "torch CPU threads during training (0 = leave as is)", "min": 0}
    )
    checkpoint_minutes: float = field(
        default=5.0,
        metadata={
            "doc": "minutes between resumable checkpoints (<output>.partial.pt; an interrupted run "
            "started again with the same options continues from it exactly; 0 = none)",
            "min": 0.0,
        },
    )
    layers: int = field(default=4, metadata={"doc": "LLaDA blocks", "min": 1, "max": 24})
    width: int = field(default=128, metadata={"doc": "d_model", "min": 8, "max": 1024})
    heads: int = field(default=4, metadata={"doc": "attention heads; divides width", "min": 1, "max": 32})
    mlp: int = field(default=384, metadata={"doc": "SwiGLU hidden size (mlp_hidden_size)", "min": 1})
    ops: list[int] = field(
        default_factory=lambda: [1, 2, 3],
        metadata={"doc": "operator counts of the training problems", "choices": list(arith.OP_COUNTS)},
    )
    gen_length: int = field(default=40, metadata={"doc": "completion length N (tokens)", "min": 8})
    max_prompt_length: int = field(default=16, metadata={"doc": "prompt tokens (left-padded)", "min": 4})
    block_length: int = field(
        default=8, metadata={"doc": "block of the block-shaped masks (the sampler's)", "min": 1}
    )
    block_mask_prob: float = field(
        default=0.75, metadata={"doc": "share of block-shaped masks", "min": 0.0, "max": 1.0}
    )
    eval_every: int = field(default=250, metadata={"doc": "steps between held-out evaluations", "min": 1})
    eval_count: int = field(default=120, metadata={"doc": "held-out problems per evaluation", "min": 1})
    eval_seed: int = field(default=99, metadata={"doc": "seed of the evaluation list", "min": 0})
    eval_steps: int = field(default=20, metadata={"doc": "block-sampler steps at evaluation", "min": 1})
    eval_temperature: float = field(
        default=1.0, metadata={"doc": "sampling temperature at evaluation", "min": 0.0}
    )
    stop_accuracy: float | None = field(
        default=None,
        metadata={
            "doc": "stop after the first evaluation whose held-out accuracy reaches this (unset = run all steps)",
            "min": 0.0,
            "max": 1.0,
        },
    )

    def check_options(self) -> list[str]:
        out = []
        if self.width % self.heads:
            out.append(f"heads: {self.heads} does not divide width {self.width}")
        if self.gen_length % self.block_length:
            out.append(f"block_length: {self.block_length} does not divide gen_length {self.gen_length}")
        longest = max((arith.longest_solution(k) for k in self.ops if k in arith.OP_COUNTS), default=0)
        if longest >= self.gen_length:
            out.append(
                f"gen_length: {self.gen_length} leaves no room for worked solutions of {longest} characters"
            )
        if not self.ops:
            out.append("ops: name at least one operator count")
        return out


# --------------------------------------------------------------------------- model parts


def arith_tokenizer():
    """The world's char-level tokenizer: LLaDA's special tokens and chat template
    (:mod:`mdmrl_plugins.llada.tiny`) over the 256 bytes with no merges, so every
    character of a problem or solution is one token; encoding a text puts LLaDA's BOS
    ``<|startoftext|>`` before it (as LLaDA's sequences start), which gives the
    prompt's first character a fixed place to be found from."""
    from tokenizers import processors

    from mdmrl_plugins.llada.tiny import BOS, SPECIAL_TOKENS, byte_level_tokenizer

    tok = byte_level_tokenizer(
        corpus=[arith.worked_solution("7+5*3-4")], vocab_size=256 + len(SPECIAL_TOKENS)
    )
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tok.convert_tokens_to_ids(BOS))]
    )
    return tok


def make_backbone(options: PretrainOptions, tokenizer=None):
    """A fresh ``llada`` backbone (float32, no chat template) of the options'
    architecture, initialised Normal(0, 0.02) from torch's global generator."""
    from mdmrl_plugins.llada.backbone import LLaDABackbone
    from mdmrl_plugins.llada.model import LLaDAModel
    from mdmrl_plugins.llada.tiny import tiny_config

    tok = tokenizer if tokenizer is not None else arith_tokenizer()
    o = options
    config = tiny_config(
        tok,
        d_model=o.width,
        n_heads=o.heads,
        n_kv_heads=o.heads,
        n_layers=o.layers,
        mlp_hidden_size=o.mlp,
        max_sequence_length=o.gen_length + o.max_prompt_length,
    )
    model = LLaDAModel(config)
    model.reset_parameters(0.02)
    return LLaDABackbone(model, tok, backbone_options(o))


def backbone_options(options: PretrainOptions, **overrides):
    from mdmrl_plugins.llada.backbone import LLaDAOptions

    fields = {
        "dtype": "float32",
        "gen_length": options.gen_length,
        "max_prompt_length": options.max_prompt_length,
        "chat_template": False,
    }
    return LLaDAOptions(**{**fields, **overrides})


# --------------------------------------------------------------------------- data


def completion_ids(tokenizer, solutions: list[str], n: int, eos: int) -> torch.Tensor:
    """long [B, n]: each solution's tokens, its end-of-sequence token, then EOS padding."""
    out = torch.full((len(solutions), n), eos, dtype=torch.long)
    for i, ids in enumerate(tokenizer(solutions, add_special_tokens=False)["input_ids"]):
        if len(ids) >= n:
            raise ValueError(f"a solution of {len(ids)} tokens does not fit {n} positions")
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def completion_masks(
    rng: np.random.Generator, lengths: list[int], n: int, block: int, block_prob: float
) -> tuple[np.ndarray, np.ndarray]:
    """(mask, loss) bool [B, n] (see the module docstring) for completions whose first
    ``lengths[i]`` positions are the solution and its end-of-sequence token: with
    probability ``block_prob`` block-shaped (b among the blocks that hold those positions;
    loss on the k masked positions of b), else k ~ U{1..n} uniformly chosen positions (loss
    on all of them). At least one loss position per row."""
    batch = len(lengths)
    blocky = rng.random(batch) < block_prob
    content_blocks = [min(n // block, -(-length // block)) for length in lengths]
    b = [int(rng.integers(0, c)) for c in content_blocks]
    k_block = rng.integers(1, block + 1, batch)
    k_flat = rng.integers(1, n + 1, batch)
    scores = rng.random((batch, n))
    masks = np.zeros((batch, n), dtype=bool)
    loss = np.zeros((batch, n), dtype=bool)
    for i in range(batch):
        if blocky[i]:
            s0, s1 = b[i] * block, (b[i] + 1) * block
            ranks = np.argsort(np.argsort(scores[i, s0:s1]))
            masks[i, s0:s1] = loss[i, s0:s1] = ranks < k_block[i]
            masks[i, s1:] = True
        else:
            ranks = np.argsort(np.argsort(scores[i]))
            masks[i] = loss[i] = ranks < k_flat[i]
    return masks, loss


def make_batch(rng: np.random.Generator, options: PretrainOptions, tokenizer, eos: int, mask_id: int):
    """(prompts, targets long [B, N], inputs long [B, N], loss bool [B, N]) of one step:
    the inputs are the targets with the mask id where masked; ``loss`` marks the positions
    whose cross-entropy counts (all masked)."""
    o = options
    problems = [
        arith.sample_problem(rng, "train", o.ops[rng.integers(len(o.ops))]) for _ in range(o.batch_size)
    ]
    targets = completion_ids(tokenizer, [arith.worked_solution(p) for p in problems], o.gen_length, eos)
    lengths = ((targets != eos).sum(1) + 1).tolist()  # the solution's tokens and its end token
    mask, loss = completion_masks(rng, lengths, o.gen_length, o.block_length, o.block_mask_prob)
    inputs = targets.masked_fill(torch.from_numpy(mask), mask_id)
    return [arith.prompt_of(p) for p in problems], targets, inputs, torch.from_numpy(loss)


def masked_loss(backbone, prompts, targets, inputs, loss) -> torch.Tensor:
    """Mean over samples of each sample's mean cross-entropy of the targets at its loss positions."""
    logits = backbone(inputs, backbone.encode_prompts(prompts), None).logits
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * loss
    return (ce.sum(1) / loss.sum(1)).mean()


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def heldout_accuracy(
    backbone, prompts: list[str], steps: int, block_length: int, temperature: float
) -> float:
    """Fraction of ``prompts`` answered correctly: one sample each (seed = index) with
    the ``block`` sampler and the ``llada`` schedule at ``temperature``."""
    from mdmrl_plugins.text.block import BlockOptions, BlockSampler
    from mdmrl_plugins.text.schedules import LLaDASchedule, LLaDAScheduleOptions

    sampler = BlockSampler(BlockOptions(block_length=block_length))
    schedule = LLaDASchedule(LLaDAScheduleOptions(temperature=temperature))
    was = backbone.training
    backbone.eval()
    traj = sampler.sample(backbone, schedule, prompts, steps, torch.arange(len(prompts)))
    backbone.train(was)
    texts = backbone.decode_text(traj.final_tokens)
    scores = arith.ArithCorrect().score_texts(prompts, texts)
    return sum(scores) / len(scores)


def eval_prompts(options: PretrainOptions) -> list[str]:
    o = options
    return arith.ArithHeldoutPrompts(
        arith.ArithPromptOptions(ops=list(o.ops), count=o.eval_count, seed=o.eval_seed)
    ).evaluation()


# --------------------------------------------------------------------------- the run


def evals_path(output: str) -> Path:
    return Path(output).with_name(Path(output).name + ".evals.jsonl")


def _read_evals(path: Path, up_to: int) -> list[list[float]]:
    """[step, accuracy] records of steps <= up_to, one per step (the last written)."""
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec["step"] <= up_to:
                by_step[rec["step"]] = rec["accuracy"]
    return [[s, by_step[s]] for s in sorted(by_step)]


def pretrain(options: PretrainOptions, output: str, progress: Progress | None = None) -> dict[str, Any]:
    """Train a fresh model and write the checkpoint folder ``output`` (config.json,
    weights and index, tokenizer files, pretrain.json with this summary) and the loss
    plot ``<output>-loss.png`` beside it. Returns the summary: options, parameter count,
    first / final loss, the step it stopped at, wall time, loss and accuracy curves."""
    from mdmrl_plugins.llada.model import save_checkpoint
    from mdmrl_plugins.shapes.pretrain import _checkpoint, _restore, loss_plot_path, lr_factor, partial_path

    start = time.perf_counter()
    o = options
    if o.threads > 0:
        torch.set_num_threads(o.threads)
    torch.manual_seed(o.seed)
    rng = np.random.default_rng(o.seed)
    tok = arith_tokenizer()
    backbone = make_backbone(o, tok)
    model = backbone.model
    model.train()
    eos, mask_id = int(model.config.eos_token_id), int(model.config.mask_token_id)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr,
        betas=(0.9, 0.99),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, o.steps, o.warmup))
    prompts_eval = eval_prompts(o)
    log = evals_path(output)

    losses: list[float] = []
    window: list[float] = []
    curve: list[list[float]] = []
    state_path = partial_path(output)
    first = 1
    if state_path.exists():
        first, losses, window, curve, earlier = _restore(state_path, o, model, opt, sched, rng)
        start -= earlier
        print(f"resuming pretraining at step {first} from {state_path}", file=sys.stderr)
    elif log.exists():
        log.unlink()
    interval = o.checkpoint_minutes * 60.0
    last_save = time.perf_counter()
    stopped = o.steps
    for step in range(first, o.steps + 1):
        loss = masked_loss(backbone, *make_batch(rng, o, tok, eos, mask_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        value = float(loss.detach())
        losses.append(value)
        window.append(value)
        stats = {}
        if step % o.eval_every == 0 or step == o.steps:
            acc = heldout_accuracy(backbone, prompts_eval, o.eval_steps, o.block_length, o.eval_temperature)
            with log.open("a") as f:
                f.write(json.dumps({"step": step, "accuracy": acc}) + "\n")
            stats["heldout_accuracy"] = acc
            if o.stop_accuracy is not None and acc >= o.stop_accuracy:
                stopped = step
        if step % o.log_every == 0 or step == o.steps or stopped == step:
            mean = sum(window) / len(window)
            curve.append([step, round(mean, 5)])
            if progress is not None:
                progress(step, {"loss": mean, "lr": opt.param_groups[0]["lr"], **stats})
            window = []
        if stopped == step:
            break
        if interval > 0 and step < o.steps and time.perf_counter() - last_save >= interval:
            _checkpoint(
                state_path,
                step,
                time.perf_counter() - start,
                o,
                model,
                opt,
                sched,
                rng,
                losses,
                window,
                curve,
            )
            last_save = time.perf_counter()

    span = max(1, min(50, len(losses) // 10))
    summary = {
        "pretrain": asdict(o),
        "parameters": sum(p.numel() for p in model.parameters()),
        "stopped_at_step": stopped,
        "first_loss": sum(losses[:span]) / span,
        "final_loss": sum(losses[-span:]) / span,
        "wall_time_s": round(time.perf_counter() - start, 1),
        "torch_version": torch.__version__,
        "loss_curve": curve,
        "heldout_accuracy_curve": _read_evals(log, stopped),
    }
    model.eval()
    folder = Path(output)
    if folder.exists():
        shutil.rmtree(folder)
    save_checkpoint(model, folder)
    tok.save_pretrained(str(folder))
    (folder / "pretrain.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, loss_plot_path(output))
    state_path.unlink(missing_ok=True)
    log.unlink(missing_ok=True)
    return summary


def plot(summary: dict, path: Path) -> None:
    """PNG: the masked loss (log scale) and the held-out accuracy against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    curve, acc = summary["loss_curve"], summary["heldout_accuracy_curve"]
    a.plot([c[0] for c in curve], [c[1] for c in curve])
    a.set_yscale("log")
    a.set_xlabel("step")
    a.set_ylabel("masked cross-entropy (nats)")
    a.grid(True, which="both", alpha=0.3)
    b.plot([c[0] for c in acc], [c[1] for c in acc], marker="o")
    b.set_ylim(0, 1)
    b.set_xlabel("step")
    b.set_ylabel("held-out accuracy")
    b.grid(True, alpha=0.3)
    fig.suptitle("arith-llada pretraining")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
