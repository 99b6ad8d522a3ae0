"""Exact resume: a run killed with SIGKILL (between iterations, in the middle of an
update, in the middle of a checkpoint write, before its first checkpoint) and resumed
reproduces, bit for bit, the metrics of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mdmrl import checkpoint as ckpt
from mdmrl.runner import run

TESTS = Path(__file__).resolve().parent

BOOT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from toy_plugin import TOYS
from mdmrl import plugins
plugins.get_registry().register_plugin(TOYS, "toys", "mdmrl-tests", "0")
kind, n = {kind!r}, {n}
count = [0]
def bomb():
    count[0] += 1
    if count[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
if kind == "checkpoint_write":
    import safetensors.torch as st
    import mdmrl.checkpoint as ck
    real = ck.save_file
    def save_file(*a, **k):
        real(*a, **k)
        bomb()
    ck.save_file = save_file
elif kind == "optimizer_step":
    import torch
    real_step = torch.optim.AdamW.step
    def step(self, *a, **k):
        bomb()
        return real_step(self, *a, **k)
    torch.optim.AdamW.step = step
elif kind == "sigint":
    import mdmrl.rundir as rd
    real_append = rd.MetricsLog.append
    def append(self, row):
        real_append(self, row)
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGINT)
    rd.MetricsLog.append = append
elif kind == "evaluation":
    import mdmrl.runner as rn
    real_evaluate = rn.evaluate
    def evaluate(*a, **k):
        bomb()
        return real_evaluate(*a, **k)
    rn.evaluate = evaluate
elif kind == "after_metrics":
    import mdmrl.rundir as rd
    real_append = rd.MetricsLog.append
    def append(self, row):
        real_append(self, row)
        bomb()
    rd.MetricsLog.append = append
from mdmrl.cli import main
sys.exit(main(["run", {recipe!r}, "--run-dir", {run_dir!r}, "--no-progress"]))
"""

SKIP_KEYS = ("time_",)


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(SKIP_KEYS)} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from toy_plugin import TOY_RECIPE, TOYS

    from mdmrl import plugins

    tmp = tmp_path_factory.mktemp("ref")
    recipe = tmp / "toy.toml"
    recipe.write_text(TOY_RECIPE.replace("tensorboard = false", "tensorboard = false\ncheckpoint_every = 1"))
    saved = plugins._REGISTRY
    reg = plugins.Registry()
    reg.register_plugin(TOYS, "toys", "mdmrl-tests", "0")
    plugins._REGISTRY = reg
    try:
        rd = run(str(recipe), str(tmp / "ref"), [], progress=False)
    finally:
        plugins._REGISTRY = saved
    return recipe, _rows(rd), _evals(rd)


def _evals(run_dir: Path) -> dict:
    return {p.name: json.loads(p.read_text()) for p in sorted((run_dir / "eval").glob("*.json"))}


def _kill(recipe: Path, run_dir: Path, kind: str, n: int) -> None:
    code = BOOT.format(tests=str(TESTS), kind=kind, n=n, recipe=str(recipe), run_dir=str(run_dir))
    env = {**os.environ, "MDMRL_LOAD_PLUGINS": ""}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


@pytest.mark.parametrize(
    ("kind", "n"),
    [("after_metrics", 2), ("optimizer_step", 7), ("checkpoint_write", 5), ("checkpoint_write", 8)],
)
def test_sigkill_then_resume_reproduces_the_metrics(reference, toy_registry, tmp_path, kind, n):
    recipe, ref_rows, _ = reference
    run_dir = tmp_path / "killed"
    _kill(recipe, run_dir, kind, n)
    done = ckpt.list_checkpoints(run_dir / "checkpoints")
    assert done, "the killed run wrote no complete checkpoint"
    assert (
        not any(p.name.startswith(".tmp") for p in (run_dir / "checkpoints").iterdir())
        or kind == "checkpoint_write"
    )
    run(None, None, [], resume=str(run_dir), progress=False)
    assert _rows(run_dir) == ref_rows


def test_resume_rejects_a_corrupt_checkpoint(reference, toy_registry, tmp_path):
    from mdmrl.errors import UserError

    recipe, _, _ = reference
    rd = run(str(recipe), str(tmp_path / "r"), ["train.cycles=1"], progress=False)
    last = ckpt.list_checkpoints(rd / "checkpoints")[-1]
    (last / "backbone.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="backbone.safetensors: corrupt or unreadable"):
        run(None, None, [], resume=str(rd), progress=False)


def test_resume_rejects_a_checkpoint_of_another_recipe(reference, toy_registry, tmp_path):
    from mdmrl.errors import UserError

    recipe, _, _ = reference
    rd = run(str(recipe), str(tmp_path / "r"), ["train.cycles=1"], progress=False)
    text = (rd / "recipe.toml").read_text().replace("seed = 3", "seed = 4")
    (rd / "recipe.toml").write_text(text)
    with pytest.raises(UserError, match="different recipe"):
        run(None, None, [], resume=str(rd), progress=False)


def test_ctrl_c_finishes_the_iteration_checkpoints_and_resumes_exactly(reference, toy_registry, tmp_path):
    recipe, ref_rows, _ = reference
    run_dir = tmp_path / "int"
    code = BOOT.format(tests=str(TESTS), kind="sigint", n=2, recipe=str(recipe), run_dir=str(run_dir))
    env = {**os.environ, "MDMRL_LOAD_PLUGINS": ""}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "writing a checkpoint" in proc.stderr and "--resume" in proc.stderr
    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")][-1] == "iter_000002"
    run(None, None, [], resume=str(run_dir), progress=False)
    assert _rows(run_dir) == ref_rows


@pytest.mark.parametrize(
    ("kind", "n", "every"),
    [("evaluation", 1, 1), ("after_metrics", 2, 100)],
    ids=["during-initial-evaluation", "after-two-iterations-without-checkpoint"],
)
def test_resume_before_the_first_checkpoint_starts_again(
    reference, toy_registry, tmp_path, capsys, kind, n, every
):
    """A run killed before its first checkpoint (during its initial evaluation, or after
    two iterations with checkpoints every 100) is started again from iteration 0 with
    the recipe saved in its directory: one line says so, the metric rows written before
    the kill are not repeated, and rows and evaluations equal the uninterrupted run's."""
    recipe, ref_rows, ref_evals = reference
    text = recipe.read_text().replace("checkpoint_every = 1", f"checkpoint_every = {every}")
    recipe = tmp_path / "toy.toml"
    recipe.write_text(text)
    run_dir = tmp_path / "killed"
    _kill(recipe, run_dir, kind, n)
    assert not ckpt.list_checkpoints(run_dir / "checkpoints")
    written = (
        (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    )
    assert len(written) == (n if kind == "after_metrics" else 0)
    capsys.readouterr()
    run(None, None, [], resume=str(run_dir), progress=False)
    err = capsys.readouterr().err
    said = [x for x in err.splitlines() if "has no checkpoint yet" in x]
    assert len(said) == 1 and "starting it again from iteration 0 with its saved recipe" in said[0], err
    assert _rows(run_dir) == ref_rows
    assert _evals(run_dir) == ref_evals


def test_the_saved_recipe_validates_as_written_and_an_older_one_still_loads(
    reference, toy_registry, tmp_path
):
    """recipe.toml leaves out the keys without effect in its mode, so it validates
    strictly (it can be run again as a recipe); one written by an earlier version, which
    held them, still loads for --resume with the same digest."""
    from mdmrl import recipe as rc
    from mdmrl.engine import recipe_digest

    recipe, _, _ = reference
    rd = run(str(recipe), str(tmp_path / "r"), ["train.cycles=1"], progress=False)
    text = (rd / "recipe.toml").read_text()
    train = text.split("[train]\n", 1)[1].split("\n[", 1)[0]
    assert "cycles = 1" in train and "iterations = " not in train.replace("_iterations = ", "")
    strict = rc.load(rd / "recipe.toml")
    older = rd / "older.toml"
    older.write_text(text.replace("[train]\n", "[train]\niterations = 10\n"))
    with pytest.raises(rc.ConfigError, match='train.iterations: has no effect in mode "alternating"'):
        rc.load(older)
    assert recipe_digest(rc.load(older, run_dir=True)) == recipe_digest(strict)
