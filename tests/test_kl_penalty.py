"""The KL penalty beta works for both objectives and every method (grpo in the Co-GRPO
recipe's model phase and in Naive GRPO; mask-grpo): with the same seed and updates large
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
    "logging.kl_steps=0",
    "train.model.lr=0.001",
    "train.model.group_size=4",
    "train.model.batch_size=8",
    "device=cpu",
]

CASES = {
    "co-grpo": (
        "co_grpo.toml",
        [
            "train.cycles=1",
            "train.model_iterations=6",
            "train.schedule_iterations=1",
            "train.schedule.group_size=4",
            "train.schedule.batch_size=8",
            "sampler.steps=4",
        ],
    ),
    "mask-grpo": ("mask_grpo.toml", ["train.iterations=6", "sampler.steps=4", "objective.options.mu=2"]),
    # Naive GRPO without guidance: at beta = 1 its late KL is not lower here (4.64 against
    # 4.71 with beta = 0, one seed), at beta = 5 it is (1.61): a penalty of one unit is
    # weak against this run's policy gradient, so the test uses the larger beta
    "naive-grpo": ("naive_grpo_no_cfg.toml", ["train.iterations=6", "sampler.steps=4"]),
}

#: the penalty's beta in the penalised run of each case (the other has beta = 0)
BETA = {"co-grpo": 1.0, "mask-grpo": 1.0, "naive-grpo": 5.0}


def late_model_kl(rd: Path) -> float:
    """Mean KL of the last three model-phase iterations (each one batch's estimate)."""
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    model_rows = [r for r in rows if r["phase"] == "model"]
    return sum(r["kl_ref_k3"] for r in model_rows[-3:]) / 3


@pytest.mark.parametrize("method", sorted(CASES))
def test_kl_penalty_keeps_the_model_closer_to_the_reference(method, tmp_path):
    recipe, extra = CASES[method]
    kls = {}
    for beta in (0.0, BETA[method]):
        rd = run(
            str(RECIPES / recipe),
            str(tmp_path / f"b{beta}"),
            [*TINY, *extra, f"objective.options.kl_beta={beta}"],
            progress=False,
        )
        kls[beta] = late_model_kl(rd)
    assert kls[0.0] > 0.0
    assert kls[BETA[method]] < 0.7 * kls[0.0], kls
