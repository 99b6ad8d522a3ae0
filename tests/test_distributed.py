"""Two CPU processes (gloo, launched by accelerate, DDP) against one process: the same
rewards and advantages, the same updated weights within float tolerance; and a
2-process run killed with SIGKILL in the middle of an update resumes to the metrics of
an uninterrupted one."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toy_plugin import TOY_RECIPE

from mdmrl import checkpoint as ckpt

TESTS = Path(__file__).resolve().parent

# script lines: rank 0 kills itself (SIGKILL) at its n-th optimizer step
KILL_RANK0_AT = """
import os, signal
import torch
if os.environ.get("RANK") == "0":
    real, count = torch.optim.AdamW.step, [0]
    def step(self, *a, **k):
        count[0] += 1
        if count[0] == {n}:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *a, **k)
    torch.optim.AdamW.step = step
"""
# ... then runs tests/toy_main.py
KILL_RANK0 = (
    KILL_RANK0_AT
    + """
import runpy, sys
sys.argv[0] = {main!r}
runpy.run_path({main!r}, run_name="__main__")
"""
)


def _free_port() -> int:
    """A TCP port nobody listens on now (a fixed port collides with a lingering run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(procs: int, script: Path) -> list[str]:
    """``accelerate launch`` of ``script`` on ``procs`` CPU processes (gloo)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(procs),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(script),
    ]


def _env() -> dict:
    return {**os.environ, "MDMRL_LOAD_PLUGINS": "", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def _launch(script: Path, procs: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(script)] if procs == 1 else launch_cmd(procs, script)
    return subprocess.run([*cmd, *args], env=_env(), capture_output=True, text=True, timeout=300)


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def _run(tmp_path, name, recipe, procs):
    run_dir = tmp_path / name
    proc = _launch(
        TESTS / "toy_main.py", procs, ["run", str(recipe), "--run-dir", str(run_dir), "--no-progress"]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = load_file(str(ckpt.list_checkpoints(run_dir / "checkpoints")[-1] / "backbone.safetensors"))
    return _rows(run_dir), weights, proc.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One recipe (3 iterations, a checkpoint after each; 3 micro-batches of 2 loss terms
    per minibatch, so that a rank has micro-batches without samples) run by one process
    and by two."""
    tmp = tmp_path_factory.mktemp("dist")
    recipe = tmp / "toy.toml"
    text = TOY_RECIPE.replace("cycles = 2", "cycles = 1").replace(
        "[eval]\nsteps = [3]\nseeds = 2", "[eval]\nsteps = [3]\nseeds = 1\nbefore = false\nafter = false"
    )
    text = text.replace("minibatches = 2", "minibatches = 2\ngradient_accumulation = 3\nterm_chunk = 2")
    recipe.write_text(text.replace("tensorboard = false", "tensorboard = false\ncheckpoint_every = 1"))
    return recipe, _run(tmp, "one", recipe, 1), _run(tmp, "two", recipe, 2)


def test_two_processes_match_one(runs):
    _, (rows1, w1, _), (rows2, w2, err2) = runs
    assert "2 processes; accelerate MULTI_CPU wraps the trained modules in DistributedDataParallel" in err2
    assert len(rows1) == len(rows2) == 3
    for a, b in zip(rows1, rows2):
        # rollouts and rewards are identical: each trajectory depends only on its own seed
        assert a["reward_mean"] == b["reward_mean"] and a["reward_std"] == b["reward_std"]
        assert a["adv_abs_mean"] == b["adv_abs_mean"]
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4), k


def test_two_processes_killed_mid_update_resume_exactly(runs, tmp_path):
    """Rank 0 is killed (SIGKILL) at its 5th optimizer step (iteration 3 of 3, after the
    checkpoint of iteration 2); the launcher stops the other rank; ``--resume`` on two
    processes reproduces the uninterrupted 2-process run's metrics."""
    recipe, _, (rows2, _, _) = runs
    run_dir = tmp_path / "killed"
    script = tmp_path / "kill_rank0.py"
    script.write_text(KILL_RANK0.format(n=5, main=str(TESTS / "toy_main.py")))
    proc = _launch(script, 2, ["run", str(recipe), "--run-dir", str(run_dir), "--no-progress"])
    assert proc.returncode != 0 and f"exitcode  : -{int(signal.SIGKILL)}" in proc.stderr, proc.stderr[-3000:]
    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == ["iter_000001", "iter_000002"]
    assert len(_rows(run_dir)) == 2
    proc = _launch(TESTS / "toy_main.py", 2, ["run", "--resume", str(run_dir), "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stderr
    assert _rows(run_dir) == rows2


def test_shutdown_leaves_the_process_group(tmp_path):
    """The CLI leaves its process group before exiting (a live gloo group can abort the
    interpreter at exit); without a group, shutdown does nothing."""
    import torch.distributed as td

    from mdmrl.distributed import shutdown

    shutdown()  # no group: a no-op
    td.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert td.is_initialized()
    shutdown()
    assert not td.is_initialized()
    # after a command that finished: alone in the group, nobody to wait for
    td.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)
    shutdown(together=True, timeout_s=1.0)
    assert not td.is_initialized()
