"""Weighted reward composites, background reward computation, and where the
rewarders run (the recipe's ``[reward_placement]``).

Three placements, one result: every process ends a rollout with the same global
rewards [B] (and components) whichever placement scores them.

- ``rank``: every process builds the rewarders on its own device and scores its own
  samples, chunk by chunk (optionally on a background thread); the global rewards
  are summed across processes.
- ``device``: only the main process builds them (on ``reward_placement.device``);
  after the rollout every process sends its finished token grids (and, when a
  rewarder reads images, its decoded images) to the main process through the process
  group, the main process scores the whole batch and broadcasts the rewards.
- ``process``: a reward process (:mod:`mdmrl.reward_server`) builds them once; every
  process sends it its chunks over TCP and receives the scores.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import torch

from mdmrl.errors import UserError
from mdmrl.interfaces import BuildContext, GeneratedBatch, Rewarder
from mdmrl.trajectory import RewardResult


class ScoringError(UserError):
    """Scoring a rollout failed, here or in another process of the run: every process
    stops (exit code 4)."""

    exit_code = 4


class RewardProcessError(ScoringError):
    """The reward process died, did not answer in time or could not score, for this
    process or another: the run writes the checkpoint of the iterations it finished
    and stops, to be resumed once a reward process is back."""


def component_labels(names: list[str]) -> list[str]:
    """The logged name of each reward component: a name used twice is ``name``,
    ``name#2``, ... (like the paper's 0.5 ImageReward + 0.5 HPSv2)."""
    seen: Counter[str] = Counter()
    out = []
    for name in names:
        seen[name] += 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


class CompositeRewarder:
    """total = sum_k w_k * R_k(images), with each component kept for logging.

    Components are ``(name, weight, rewarder)``; a name used twice is logged as
    ``name``, ``name#2``, ... (:func:`component_labels`).
    """

    def __init__(self, components: list[tuple[str, float, Rewarder]]):
        if not components:
            raise ValueError("CompositeRewarder needs at least one component")
        labels = component_labels([name for name, _, _ in components])
        self.components: list[tuple[str, float, Rewarder]] = [
            (label, float(weight), rewarder) for label, (_, weight, rewarder) in zip(labels, components)
        ]

    @property
    def labels(self) -> list[str]:
        return [label for label, _, _ in self.components]

    def __call__(self, batch: GeneratedBatch) -> RewardResult:
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(batch.prompts), dtype=torch.float32)
        for label, weight, rewarder in self.components:
            score = rewarder.score(batch).detach().to("cpu", torch.float32)
            if score.shape != total.shape:
                raise RuntimeError(
                    f"rewarder {label!r} returned shape {tuple(score.shape)}, expected {tuple(total.shape)}"
                )
            parts[label] = score
            total = total + weight * score
        return RewardResult(total=total, components=parts)


class DeferredRewarder:
    """The recipe's rewarders in a process that does not score in training (placements
    ``device`` off the main process, and ``process``): nothing is built unless this
    process scores after all (``mdmrl eval`` of such a recipe); then they are built
    once, on the first call."""

    def __init__(self, labels: list[str], build: Callable[[], CompositeRewarder]):
        self.labels = labels
        self._build = build
        self._built: CompositeRewarder | None = None
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        return self._built is not None

    def __call__(self, batch: GeneratedBatch) -> RewardResult:
        with self._lock:
            if self._built is None:
                self._built = self._build()
        return self._built(batch)


def process_rank() -> int:
    """This process's rank in the launch (``RANK``, set by ``accelerate launch`` and
    torchrun), 0 without one."""
    return int(os.environ.get("RANK", "0") or 0)


def placement_device(name: str | None, default: torch.device) -> torch.device:
    """``reward_placement.device`` as a torch device (``default`` when left out)."""
    if name is None:
        return torch.device(default)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"reward_placement.device: {name!r} was asked for but no CUDA device is available; "
            'use device = "cpu"'
        )
    return torch.device(name)


def build_rewarders(
    recipe: Any, ctx: BuildContext, build_one: Callable[[int, BuildContext], Rewarder]
) -> CompositeRewarder | DeferredRewarder:
    """The recipe's reward composite as this process needs it: built on ``ctx.device``
    (placement ``rank``), built on the placement's device in the main process
    (``device``), or deferred (``device`` in the other processes, and ``process``,
    whose rewarders live in the reward process). ``build_one(i, ctx)`` builds
    ``rewards[i]``."""
    placement = recipe.reward_placement
    names = [spec.name for spec in recipe.rewards]

    def build(at: BuildContext) -> CompositeRewarder:
        return CompositeRewarder(
            [(spec.name, spec.weight, build_one(i, at)) for i, spec in enumerate(recipe.rewards)]
        )

    if placement.mode == "rank":
        return build(ctx)
    at = replace(ctx, device=placement_device(placement.device, ctx.device))
    if placement.mode == "device" and process_rank() == 0:
        return build(at)
    return DeferredRewarder(component_labels(names), lambda: build(at))


class RewardWorker:
    """Runs a :class:`CompositeRewarder` inline or on a background thread.

    With ``background=True``, :meth:`submit` returns at once and the engine samples
    the next rollout chunk while the previous chunk is scored, so an iteration costs
    about max(rollout, reward) instead of their sum (torch ops release the GIL).
    """

    def __init__(self, rewarder: Callable[[GeneratedBatch], RewardResult], background: bool = False):
        self.rewarder = rewarder
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="mdmrl-reward") if background else None
        )

    def submit(self, batch: GeneratedBatch) -> Future:
        if self._pool is None:
            fut: Future = Future()
            try:
                fut.set_result(self.rewarder(batch))
            except BaseException as exc:  # noqa: BLE001 - re-raised by .result()
                fut.set_exception(exc)
            return fut
        return self._pool.submit(self.rewarder, batch)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def concat_results(results: list[RewardResult]) -> RewardResult:
    return RewardResult(
        total=torch.cat([r.total for r in results]),
        components={k: torch.cat([r.components[k] for r in results]) for k in results[0].components},
    )


# -- scoring one rollout ------------------------------------------------------------------
class ChunkScoring:
    """Placements ``rank`` and ``process``: each process scores its own chunks as they
    are sampled (inline or on a background thread), then the global rewards are
    summed across processes. ``rewarder``: the local composite, or the reward
    process's client."""

    def __init__(self, rewarder: Callable[[GeneratedBatch], RewardResult], dist: Any, background: bool):
        self.rewarder = rewarder
        self.dist = dist
        self._worker = RewardWorker(rewarder, background)

    def submit(self, batch: GeneratedBatch) -> Future:
        return self._worker.submit(batch)

    def collect(
        self, futures: list[Future], local: torch.Tensor, prompts: list[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Global total rewards float64 [B] and components, on every process. A process
        that could not score stops every process (no process waits for it)."""
        failure: BaseException | None = None
        try:
            res = concat_results([f.result() for f in futures])
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every process
            failure = exc
        stop_together(self.dist, failure)
        n = len(prompts)
        total = self.dist.scatter_sum(res.total, local, n)
        comps = {k: self.dist.scatter_sum(v, local, n) for k, v in res.components.items()}
        return total, comps

    def close(self) -> None:
        self._worker.close()


def stop_together(dist: Any, failure: BaseException | None) -> None:
    """Raise on every process when scoring failed on any (one collective), so that no
    process is left waiting for another. When every failure is a
    :class:`RewardProcessError`, every process raises one (the engine then checkpoints,
    all processes alike); otherwise a process raises its own error, or a
    :class:`ScoringError` naming the other process's."""
    lost = failure is not None and isinstance(failure, RewardProcessError)
    broken = failure is not None and not lost
    if not dist.active:
        counts = [int(lost), int(broken)]
    else:
        t = torch.tensor([int(lost), int(broken)], dtype=torch.long, device=dist.accelerator.device)
        counts = dist.accelerator.reduce(t, "sum").tolist()
    if not any(counts):
        return
    if counts[1]:
        if broken:
            raise failure
        raise ScoringError(
            str(failure)
            if lost
            else "scoring failed in another process of this run (its error is printed there)"
        )
    if lost:
        raise failure
    raise RewardProcessError(
        "the reward process failed for another process of this run (its error is printed there)"
    )


class _Probe:
    """A decoder that notes whether a rewarder asked for images."""

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor] | None):
        self.decode = decode
        self.used = False

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.used = True
        if self.decode is None:
            raise RuntimeError("GeneratedBatch has no decoder for images")
        return self.decode(tokens)


def _gather_rows(dist: Any, rows: torch.Tensor, counts: list[int]) -> torch.Tensor | None:
    """Every process's ``rows`` [n_r, ...] (n_r = counts[r]) on the main process, as
    one tensor in the global order of the sharding rule (row b from process b mod P);
    None on the others."""
    import torch.distributed as td

    device = dist.accelerator.device
    most = max(counts)
    padded = torch.zeros((most, *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    if dist.rank != 0:
        td.gather(padded, None, dst=0)
        return None
    parts = [torch.empty_like(padded) for _ in counts]
    td.gather(padded, parts, dst=0)
    n, p = sum(counts), len(counts)
    out = torch.empty((n, *rows.shape[1:]), dtype=rows.dtype, device=device)
    for r, part in enumerate(parts):
        out[r:n:p] = part[: counts[r]]
    return out


class GatheredScoring:
    """Placement ``device``: every process keeps its chunks; after the rollout the main
    process gathers the token grids of the whole batch (and the decoded images, once a
    rewarder has been seen to read them), scores them with the only built rewarders,
    and broadcasts the rewards. ``rewarder``: the built composite on the main process
    (unused elsewhere)."""

    def __init__(self, rewarder: Any, dist: Any, labels: list[str]):
        self.rewarder = rewarder
        self.dist = dist
        self.labels = labels
        # Whether a rewarder reads images: learned from the first batch, which the main
        # process decodes itself; later, every process sends its own decoded images.
        self.needs_images = False

    def submit(self, batch: GeneratedBatch) -> Future:
        fut: Future = Future()
        fut.set_result(batch)
        return fut

    def collect(
        self, futures: list[Future], local: torch.Tensor, prompts: list[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        import torch.distributed as td

        dist, n, k = self.dist, len(prompts), len(self.labels)
        batches: list[GeneratedBatch] = [f.result() for f in futures]
        counts = [len(range(r, n, dist.world_size)) for r in range(dist.world_size)]
        send_images = self.needs_images
        tokens = torch.cat([b.tokens for b in batches])
        images = torch.cat([b.images for b in batches]) if send_images else None
        if dist.active:
            tokens = _gather_rows(dist, tokens, counts)
            if send_images:
                images = _gather_rows(dist, images, counts)
        # [ok, reads images, total (n), component 1 (n), ...], sent by the main process
        out = torch.zeros(2 + (1 + k) * n, dtype=torch.float64, device=dist.accelerator.device)
        failure: BaseException | None = None
        if dist.rank == 0:
            probe = _Probe(batches[0].decode_fn)
            batch = GeneratedBatch(list(prompts), tokens, batches[0].grid_shape, probe)
            batch._images = images
            try:
                res = self.rewarder(batch)
                values = [res.total] + [res.components[label] for label in self.labels]
                out[0], out[1] = 1.0, float(send_images or probe.used)
                out[2:] = torch.cat([v.to(torch.float64) for v in values]).to(out.device)
            except Exception as exc:  # noqa: BLE001 - re-raised below; the others stop too
                failure = exc
        if dist.active:
            td.broadcast(out, src=0)
        out = out.cpu()
        if out[0] != 1.0:
            if failure is not None:
                raise failure
            raise ScoringError(
                'scoring failed on the main process, which holds the rewarders (reward_placement.mode = "device"); '
                "its error is printed there"
            )
        self.needs_images = bool(out[1])
        values = out[2:].view(1 + k, n)
        return values[0].clone(), {label: values[1 + i].clone() for i, label in enumerate(self.labels)}

    def close(self) -> None:
        pass


def start_scoring(loaded: Any, rewarder: Any, dist: Any, background: bool):
    """The engine's scorer for the recipe's placement (``submit`` each chunk,
    ``collect`` the global rewards, ``close``; ``.rewarder`` scores this process's
    evaluations). Placement ``process`` starts the reward process (main process) or
    connects to it; placement ``device`` needs the built rewarders on the main
    process."""
    recipe = loaded.recipe
    mode = recipe.reward_placement.mode
    if mode == "process":
        from mdmrl.reward_server import connect

        return ChunkScoring(connect(loaded, dist), dist, background)
    if mode == "device":
        labels = component_labels([spec.name for spec in recipe.rewards])
        return GatheredScoring(rewarder, dist, labels)
    return ChunkScoring(rewarder, dist, background)
