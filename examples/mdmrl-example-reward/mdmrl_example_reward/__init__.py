"""A minimal third-party mdmrl plug-in, the one docs/writing-plugins.md walks through:

- ``brightness`` rewards images whose mean brightness is close to a target;
- ``threshold`` holds another rewarder (named in its options, with that rewarder's own
  options) and gives 1 where its score reaches a threshold.

Install it (``pip install ./examples/mdmrl-example-reward``) and name them in a recipe::

    [[rewards]]
    name = "brightness"
    weight = 1.0
    [rewards.options]
    target = 0.7
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mdmrl.hookspecs import hookimpl
from mdmrl.interfaces import BuildContext, GeneratedBatch, Rewarder
from mdmrl.options import build_plugin, plugin_name, plugin_options


@dataclass
class BrightnessOptions:
    target: float = field(default=0.5, metadata={"doc": "wanted mean brightness", "min": 0.0, "max": 1.0})


class BrightnessReward(Rewarder):
    """1 - |mean brightness - target|, in [0, 1]."""

    name = "brightness"
    Options = BrightnessOptions

    def __init__(self, options: BrightnessOptions):
        self.target = options.target

    def score(self, batch: GeneratedBatch) -> torch.Tensor:
        brightness = batch.images.float().mean(dim=(1, 2, 3)).cpu()
        return 1.0 - (brightness - self.target).abs()


@dataclass
class ThresholdOptions:
    reward: str = plugin_name("rewarder", "brightness", doc="the rewarder whose score is thresholded")
    reward_options: dict = plugin_options("reward", doc="its options, checked by its own Options")
    threshold: float = field(default=0.5, metadata={"doc": "score from which an image earns 1"})


class ThresholdReward(Rewarder):
    """1 where another rewarder's score reaches ``threshold``, else 0."""

    name = "threshold"
    Options = ThresholdOptions

    def __init__(self, inner: Rewarder, threshold: float):
        self.inner = inner
        self.threshold = threshold

    @classmethod
    def from_options(cls, options: ThresholdOptions, ctx: BuildContext) -> Rewarder:
        inner = build_plugin("rewarder", options.reward, options.reward_options, ctx)
        return cls(inner, options.threshold)

    def score(self, batch: GeneratedBatch) -> torch.Tensor:
        return (self.inner.score(batch) >= self.threshold).float()


@hookimpl
def register_rewarders(register):
    register(BrightnessReward)
    register(ThresholdReward)
