"""The KL penalty beta works for every objective: with the same seed and updates large
enough to move the model, a run with kl_beta > 0 ends closer to the initial model (the
engine's kl_ref_k3 monitor on the rollout tokens) than the same run with kl_beta = 0.

The committed shapes-mdm (a random one earns no reward to learn from), eight
images per iteration at four steps, a learning rate far above the recipes', no evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mdmrl.runner import run

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "shapes"

TINY = [
    "eval.before=false",
    "eval.after=false",
    "logging.image_every=0",
    "logging.tensorboard=false",
    "logging.checkpoint_every=100",
    "train.model.lr=0.003",
    "train.model.group_size=4",
    "train.model.batch_size=8",
    "device=cpu",
]

CASES = {
    "naive-grpo": (
        "naive_grpo.toml",
        ["train.iterations=4", "sampler.steps=4", "schedule.options.cfg_scale=1.0"],
    ),
    "co-grpo": (
        "co_grpo.toml",
        [
            "train.cycles=1",
            "train.model_iterations=4",
            "train.schedule_iterations=1",
            "train.schedule.group_size=4",
            "train.schedule.batch_size=8",
            "sampler.steps=4",
        ],
    ),
    "mask-grpo": ("mask_grpo.toml", ["train.iterations=4", "sampler.steps=4", "objective.options.mu=2"]),
}


def last_model_kl(rd: Path) -> float:
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    model_rows = [r for r in rows if r["phase"] == "model"]
    return model_rows[-1]["kl_ref_k3"]


@pytest.mark.parametrize("method", sorted(CASES))
def test_kl_penalty_keeps_the_model_closer_to_the_reference(method, tmp_path):
    recipe, extra = CASES[method]
    kls = {}
    for beta in (0.0, 5.0):
        rd = run(
            str(RECIPES / recipe),
            str(tmp_path / f"b{beta}"),
            [*TINY, *extra, f"objective.options.kl_beta={beta}"],
            progress=False,
        )
        kls[beta] = last_model_kl(rd)
    assert kls[0.0] > 0.0
    assert kls[5.0] < 0.7 * kls[0.0], kls
