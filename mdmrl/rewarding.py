"""Weighted reward composites and background reward computation."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from mdmrl.interfaces import GeneratedBatch, Rewarder
from mdmrl.trajectory import RewardResult


class CompositeRewarder:
    """total = sum_k w_k * R_k(images), with each component kept for logging.

    Components are ``(name, weight, rewarder)``; a name used twice is logged as
    ``name``, ``name#2``, ... (like the paper's 0.5 ImageReward + 0.5 HPSv2).
    """

    def __init__(self, components: list[tuple[str, float, Rewarder]]):
        if not components:
            raise ValueError("CompositeRewarder needs at least one component")
        seen: Counter[str] = Counter()
        self.components: list[tuple[str, float, Rewarder]] = []
        for name, weight, rewarder in components:
            seen[name] += 1
            label = name if seen[name] == 1 else f"{name}#{seen[name]}"
            self.components.append((label, float(weight), rewarder))

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


class RewardWorker:
    """Runs a :class:`CompositeRewarder` inline or on a background thread.

    With ``background=True``, :meth:`submit` returns at once and the engine samples
    the next rollout chunk while the previous chunk is scored, so an iteration costs
    about max(rollout, reward) instead of their sum (torch ops release the GIL).
    """

    def __init__(self, rewarder: CompositeRewarder, background: bool = False):
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
