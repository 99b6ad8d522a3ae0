"""The shipped LLaDA recipe: it validates, `mdmrl run` stops with one line when the
weights are absent, and with a tiny checkpoint in their place (and only the sizes
changed) it trains end to end through the engine."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from mdmrl.cli import main

ROOT = Path(__file__).resolve().parents[3]
RECIPE = ROOT / "recipes" / "text" / "llada_mask_grpo.toml"
EXAMPLE = ROOT / "recipes" / "text" / "gsm8k_example.jsonl"


def _call(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_the_recipe_validates_and_names_its_parts():
    code, out, err = _call(["validate", str(RECIPE)])
    assert code == 0 and err == ""
    assert "backbone=llada schedule=llada sampler=block (T=128) objective=mask-grpo" in out
    assert "0.5*gsm8k-format, 0.5*gsm8k-integer, 2.0*gsm8k-correct" in out


def test_run_without_the_weights_is_one_line_and_leaves_no_run_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    code, out, err = _call(["run", str(RECIPE), "--run-dir", str(run_dir), "--no-progress"])
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("mdmrl: error: backbone.options.path: LLaDA weights not found")
    assert "GSAI-ML/LLaDA-8B-Instruct" in err
    assert not run_dir.exists()


def test_the_recipe_trains_a_tiny_checkpoint_end_to_end(tmp_path):
    from mdmrl_plugins.llada.tiny import byte_level_tokenizer, write_checkpoint

    folder = tmp_path / "tiny-llada"
    write_checkpoint(folder, byte_level_tokenizer())
    sizes = [
        f"backbone.options.path={json.dumps(str(folder))}",
        'backbone.options.dtype="float32"',
        "backbone.options.gen_length=16",
        "backbone.options.max_prompt_length=256",
        "backbone.options.lora_rank=2",
        "sampler.steps=4",
        "sampler.options.block_length=8",
        f"prompts.train.options.train={json.dumps(str(EXAMPLE))}",
        f"prompts.eval.options.train={json.dumps(str(EXAMPLE))}",
        f"rewards.2.options.answers=[{json.dumps(str(EXAMPLE))}]",
        "objective.options.mu=2",
        "train.iterations=2",
        "train.model.batch_size=4",
        "train.model.group_size=2",
        "train.rollout_batch=4",
        "train.gradient_accumulation=2",
        "eval.max_prompts=2",
        "eval.steps=[4]",
        "logging.image_every=1",
    ]
    run_dir = tmp_path / "run"
    argv = ["run", str(RECIPE), "--run-dir", str(run_dir), "--no-progress"]
    code, out, err = _call(argv + [a for s in sizes for a in ("--set", s)])
    assert code == 0, err
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    for name in ("gsm8k-format", "gsm8k-integer", "gsm8k-correct"):
        assert f"reward/{name}_mean" in rows[0]
    assert rows[0]["ratio_mean"] == 1.0  # the first inner update is on-policy
    assert (run_dir / "eval" / "summary.md").is_file() and (run_dir / "images" / "iter_000001.png").is_file()
