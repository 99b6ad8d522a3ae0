"""A minimal third-party mdmrl plug-in: rewards images whose mean brightness is close
to a target. Install it (``pip install ./examples/mdmrl-example-reward``) and name it
in a recipe::

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
from mdmrl.interfaces import GeneratedBatch, Rewarder


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


@hookimpl
def register_rewarders(register):
    register(BrightnessReward)
