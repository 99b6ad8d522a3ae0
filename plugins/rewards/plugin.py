"""Registers the reward-model rewarders: ``image-reward``, ``hpsv2`` and ``clip-score``.

Importing this module, or the modules it registers, imports no reward-model library;
each rewarder imports its library when it first loads its model.
"""

from __future__ import annotations

from mdmrl.hookspecs import Register, hookimpl


@hookimpl
def register_rewarders(register: Register) -> None:
    from mdmrl_plugins.rewards.clipscore import CLIPScoreRewarder
    from mdmrl_plugins.rewards.hps import HPSv2Rewarder
    from mdmrl_plugins.rewards.imagereward import ImageRewardRewarder

    register(ImageRewardRewarder)
    register(HPSv2Rewarder)
    register(CLIPScoreRewarder)
