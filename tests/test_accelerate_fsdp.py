"""FSDP (accelerate's FSDP2, full shard) on two CPU processes with gloo: the Co-GRPO
shapes recipe (model and schedule phases, a learned Gaussian schedule) trains to the
weights of one process within float tolerance, its checkpoints hold every rank's
shards plus the whole weights, and a run killed with SIGKILL in the middle of an
update resumes to the metrics of an uninterrupted one.

torch runs FSDP2 on CPU with gloo, but accelerate 1.15 selects FSDP only for
GPU-type process groups (on CPU an FSDP config would run DDP, which mdmrl refuses).
The launched script therefore sets accelerate's process type to the GPU one before
mdmrl starts (FORCE below, one line); from there on everything is accelerate's own
FSDP2 path: wrapping, optimizers, gradient reduce-scatter."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import co_grpo_tiny
import pytest
import torch
from safetensors.torch import load_file

from mdmrl import checkpoint as ckpt

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(co_grpo_tiny.RECIPE)
SETS = co_grpo_tiny.SETS + [
    "train.gradient_accumulation=2",
    "logging.checkpoint_every=1",
    "logging.image_every=2",
]

FORCE = """
from accelerate.state import PartialState
from accelerate.utils import DistributedType
PartialState(cpu=True)
PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # FORCE: FSDP on CPU
"""
RUN_MDMRL = """
import runpy, sys
sys.argv[0] = "mdmrl"
runpy.run_module("mdmrl", run_name="__main__")
"""

# configs/accelerate/fsdp.yaml on 2 processes, fp32 (exact comparisons), one FSDP unit
# per block of shapes-mdm
CONFIG_CHANGES = {
    "num_processes: 8": "num_processes: 2",
    "mixed_precision: bf16": "mixed_precision: 'no'",
    "cls_to_wrap: DualStreamBlock,SingleStreamBlock": "cls_to_wrap: Block",
}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MDMRL_LOAD_PLUGINS"}
    return {**env, "OMP_NUM_THREADS": "1"}


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def _fsdp(tmp: Path, args: list[str], kill: int = 0) -> subprocess.CompletedProcess:
    from test_distributed import KILL_RANK0_AT, _free_port

    text = (ROOT / "configs" / "accelerate" / "fsdp.yaml").read_text()
    for old, new in CONFIG_CHANGES.items():
        assert old in text, old
        text = text.replace(old, new)
    (tmp / "fsdp_cpu.yaml").write_text(text)
    script = tmp / f"force_{kill}.py"
    script.write_text(FORCE + (KILL_RANK0_AT.format(n=kill) if kill else "") + RUN_MDMRL)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp / "fsdp_cpu.yaml")]
    cmd += ["--main_process_port", str(_free_port()), str(script), *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def _run_args(run_dir: Path) -> list[str]:
    sets = [x for s in SETS for x in ("--set", s)]
    return ["run", RECIPE, "--run-dir", str(run_dir), "--no-progress", *sets]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The recipe run by one process and by two under FSDP."""
    tmp = tmp_path_factory.mktemp("fsdp")
    one = subprocess.run(
        [sys.executable, "-m", "mdmrl", *_run_args(tmp / "one")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = _fsdp(tmp, _run_args(tmp / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    return tmp, two.stderr


def test_fsdp_on_two_processes_trains_the_weights_of_one(runs):
    tmp, err = runs
    assert "2 processes; accelerate FSDP wraps the trained modules in FSDPTrainStep" in err
    rows1, rows2 = _rows(tmp / "one"), _rows(tmp / "two")
    assert [r["phase"] for r in rows2] == ["model", "model", "schedule"]
    for a, b in zip(rows1, rows2, strict=True):
        assert a["reward_mean"] == b["reward_mean"] and a["adv_abs_mean"] == b["adv_abs_mean"]
    last1 = ckpt.list_checkpoints(tmp / "one" / "checkpoints")[-1]
    last2 = ckpt.list_checkpoints(tmp / "two" / "checkpoints")[-1]
    for name in ("backbone", "schedule"):
        w1 = load_file(str(last1 / f"{name}.safetensors"))
        w2 = load_file(str(last2 / f"{name}.safetensors"))  # whole weights, gathered from the shards
        assert set(w1) == set(w2) and w1
        for k in w1:
            assert w1[k].shape == w2[k].shape and torch.allclose(w1[k], w2[k], atol=1e-4, rtol=1e-3), k
    # every rank wrote its shard; both optimizers had stepped by the schedule phase
    assert sorted(p.name for p in (last2 / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert json.loads((last2 / "meta.json").read_text())["sharded_optimizers"] == ["model", "schedule"]
    assert not (last1 / "sharded").exists()
    # the main process evaluated (base, reference, trained) and drew images alone
    for name in ("base@4.json", "reference@4.json", "trained@4.json"):
        e1, e2 = (json.loads((tmp / d / "eval" / name).read_text()) for d in ("one", "two"))
        assert e1.keys() == e2.keys()
        if name != "trained@4.json":  # the trained weights differ within float tolerance
            assert e1["metrics"] == e2["metrics"], name
    assert (tmp / "two" / "images" / "iter_000002.png").is_file()
    # evaluation, sampling and export read a sharded run's checkpoint as any other
    from mdmrl.runner import load_for_eval

    _, parts = load_for_eval(None, str(tmp / "two"), [])
    for k, v in load_file(str(last2 / "backbone.safetensors")).items():
        assert torch.equal(parts.backbone.get_parameter(k).detach(), v), k


def test_fsdp_killed_mid_update_resumes_exactly(runs):
    """Rank 0 is killed (SIGKILL) at its 3rd optimizer step: iteration 2 of 3, after
    the checkpoint of iteration 1 (whose schedule optimizer has no state yet); the
    resume on two FSDP processes reads the shards back and reproduces the
    uninterrupted FSDP run's metrics."""
    tmp, _ = runs
    run_dir = tmp / "killed"
    proc = _fsdp(tmp, _run_args(run_dir), kill=3)
    assert proc.returncode != 0 and f"exitcode  : -{int(signal.SIGKILL)}" in proc.stderr, proc.stderr[-3000:]
    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == ["iter_000001"]
    proc = _fsdp(tmp, ["run", "--resume", str(run_dir), "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stderr
    assert _rows(run_dir) == _rows(tmp / "two")
