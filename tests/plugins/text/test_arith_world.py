"""The committed model of the embedded text world and its recipes: the checkpoint loads
through the llada backbone's path, the block sampler gets parsable answers from it, the
recipes validate, and the RL recipe trains for two iterations."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import tomllib
import torch

from mdmrl import options as opt_schema
from mdmrl.cli import main
from mdmrl.interfaces import BuildContext
from mdmrl_plugins.llada.backbone import LLaDABackbone, LLaDAOptions
from mdmrl_plugins.text import arith
from mdmrl_plugins.text import pretrain as tp

ROOT = Path(__file__).resolve().parents[3]
RL_RECIPE = ROOT / "recipes" / "text" / "mask_grpo.toml"
PT_RECIPE = ROOT / "recipes" / "text" / "pretrain.toml"
WEIGHTS = ROOT / "plugins" / "text" / "weights" / "arith-llada"


def _call(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def backbone():
    recipe = tomllib.loads(RL_RECIPE.read_text())
    opts = LLaDAOptions(**recipe["backbone"]["options"])
    return LLaDABackbone.from_options(opts, BuildContext(recipe_dir=str(RL_RECIPE.parent)))


def test_the_committed_checkpoint_is_a_llada_folder_of_the_pretraining_recipe(backbone):
    names = {p.name for p in WEIGHTS.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "pretrain.json"} <= names
    config = json.loads((WEIGHTS / "config.json").read_text())
    assert config["model_type"] == "llada" and config["block_type"] == "llama"
    assert sum(p.stat().st_size for p in WEIGHTS.iterdir()) < 8 * 2**20
    meta = json.loads((WEIGHTS / "pretrain.json").read_text())
    recipe = tomllib.loads(PT_RECIPE.read_text())
    assert recipe["pretrain"]["output"] == "plugins/text/weights/arith-llada"
    for key, value in recipe["pretrain"]["options"].items():  # written by this recipe
        assert meta["pretrain"][key] == value, key
    assert meta["parameters"] == sum(p.numel() for p in backbone.model.parameters())
    assert (WEIGHTS.parent / "arith-llada-loss.png").stat().st_size > 1000
    assert backbone.model.config.d_model == recipe["pretrain"]["options"]["width"]
    assert "model.transformer.blocks.0.q_proj.weight" in backbone.model.state_dict()


def test_the_pretraining_recipe_validates():
    code, out, err = _call(["validate", str(PT_RECIPE)])
    assert code == 0 and err == "", err
    assert "backbone=llada output=plugins/text/weights/arith-llada" in out
    problems: list[str] = []
    data = tomllib.loads(PT_RECIPE.read_text())["pretrain"]["options"]
    opts = opt_schema.build(tp.PretrainOptions, data, "pretrain.options", problems)
    assert problems == [] and opts.check_options() == []


def test_the_block_sampler_gets_parsable_answers_from_the_committed_model(backbone):
    from mdmrl_plugins.text.block import BlockOptions, BlockSampler
    from mdmrl_plugins.text.schedules import LLaDASchedule, LLaDAScheduleOptions

    prompts = arith.ArithHeldoutPrompts(arith.ArithPromptOptions(count=32)).evaluation()
    schedule = LLaDASchedule(LLaDAScheduleOptions(temperature=0.0))
    traj = BlockSampler(BlockOptions(block_length=8)).sample(
        backbone, schedule, prompts, 20, torch.arange(32)
    )
    texts = backbone.decode_text(traj.final_tokens)
    fmt = arith.ArithFormat().score_texts(prompts, texts)
    answers = [arith.final_answer(t) for t in texts]
    assert sum(fmt) >= 24, texts  # the worked format, almost always
    assert sum(a is not None for a in answers) >= 24
    correct = arith.ArithCorrect().score_texts(prompts, texts)
    assert 0 < sum(correct) < 32  # neither untrained nor perfect: room for RL


def test_the_rl_recipe_validates():
    code, out, err = _call(["validate", str(RL_RECIPE)])
    assert code == 0 and err == "", err
    assert "backbone=llada schedule=llada sampler=block (T=20) objective=mask-grpo" in out
    assert "0.25*arith-format, 1.0*arith-correct" in out


def test_the_rl_recipe_trains_two_iterations(tmp_path):
    sizes = [
        "train.iterations=2",
        "objective.options.mu=1",  # one term per rollout batch: the only update is on-policy
        "train.model.batch_size=8",
        "train.model.group_size=4",
        "train.rollout_batch=8",
        "prompts.eval.options.count=3",
        "eval.seeds=1",
        "logging.checkpoint_every=1",
    ]
    run_dir = tmp_path / "run"
    argv = ["run", str(RL_RECIPE), "--run-dir", str(run_dir), "--no-progress"]
    code, out, err = _call(argv + [a for s in sizes for a in ("--set", s)])
    assert code == 0, err
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert rows[0]["ratio_mean"] == 1.0 and rows[1]["ratio_mean"] == 1.0
    for name in ("arith-format", "arith-correct"):
        assert f"reward/{name}_mean" in rows[0]
    summary = (run_dir / "eval" / "summary.md").read_text()
    assert "| 1 op |" in summary and "| 3 ops |" in summary and "arith-correct" in summary
