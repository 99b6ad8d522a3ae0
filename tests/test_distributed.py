"""Two CPU processes (gloo, launched by accelerate) against one process: the same
rewards and advantages, and the same updated weights within float tolerance."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from toy_plugin import TOY_RECIPE

from mdmrl import checkpoint as ckpt

TESTS = Path(__file__).resolve().parent


def _free_port() -> int:
    """A TCP port nobody listens on now (a fixed port collides with a lingering run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, name, recipe, procs):
    env = {**os.environ, "MDMRL_LOAD_PLUGINS": "", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / name
    if procs == 1:
        cmd = [sys.executable, str(TESTS / "toy_main.py")]
    else:
        cmd = [
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
            str(TESTS / "toy_main.py"),
        ]
    proc = subprocess.run(
        [*cmd, "run", str(recipe), "--run-dir", str(run_dir), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    weights = load_file(str(ckpt.list_checkpoints(run_dir / "checkpoints")[-1] / "backbone.safetensors"))
    return rows, weights


def test_two_processes_match_one(tmp_path):
    recipe = tmp_path / "toy.toml"
    text = TOY_RECIPE.replace("cycles = 2", "cycles = 1").replace(
        "[eval]\nsteps = [3]\nseeds = 2", "[eval]\nsteps = [3]\nseeds = 1\nbefore = false\nafter = false"
    )
    recipe.write_text(text)
    rows1, w1 = _run(tmp_path, "one", recipe, 1)
    rows2, w2 = _run(tmp_path, "two", recipe, 2)
    assert len(rows1) == len(rows2) == 3
    for a, b in zip(rows1, rows2):
        # rollouts and rewards are identical: each trajectory depends only on its own seed
        assert a["reward_mean"] == b["reward_mean"] and a["reward_std"] == b["reward_std"]
        assert a["adv_abs_mean"] == b["adv_abs_mean"]
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4), k


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
