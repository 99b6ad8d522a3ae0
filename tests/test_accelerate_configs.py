"""The shipped accelerate configs (configs/accelerate/) and the two ways to launch with
one: ``mdmrl run RECIPE --accelerate-config FILE`` and ``accelerate launch
--config_file FILE -m mdmrl run RECIPE``; a config that cannot run here is one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from toy_plugin import TOY_RECIPE

from mdmrl.cli import main
from mdmrl.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "accelerate"

# name -> (distributed type, processes, machines, mixed precision, what else it must say)
EXPECTED = {
    "cpu": ("MULTI_GPU", 2, 1, "no", {"use_cpu": True}),
    "ddp": ("MULTI_GPU", 8, 1, "no", {"use_cpu": False}),
    "fsdp": ("FSDP", 8, 1, "bf16", {"fsdp_config.fsdp_reshard_after_forward": True}),
    "zero2": ("DEEPSPEED", 8, 1, "bf16", {"deepspeed_config.zero_stage": 2}),
    "zero3": ("DEEPSPEED", 8, 1, "bf16", {"deepspeed_config.zero_stage": 3}),
    "multinode": ("FSDP", 16, 2, "bf16", {"machine_rank": 0, "main_process_port": 29500}),
}


def _get(config, dotted: str):
    obj = config
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def test_every_shipped_config_parses_and_names_its_engine():
    from accelerate.commands.config.config_args import load_config_from_file

    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    running = (ROOT / "docs" / "running.md").read_text()
    for name, (kind, procs, machines, mp, extra) in EXPECTED.items():
        path = CONFIGS / f"{name}.yaml"
        config = load_config_from_file(str(path))
        assert str(config.distributed_type).split(".")[-1] == kind, name
        assert (config.num_processes, config.num_machines, config.mixed_precision) == (procs, machines, mp)
        for key, value in extra.items():
            assert _get(config, key) == value, (name, key)
        if kind == "FSDP":
            assert config.fsdp_config["fsdp_version"] == 2
            assert config.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
            assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
            blocks = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
            source = (ROOT / "plugins" / "meissonic" / "transformer.py").read_text()
            assert blocks and all(f"class {b}(nn.Module)" in source for b in blocks)  # Meissonic's blocks
        text = path.read_text()
        rel = f"configs/accelerate/{name}.yaml"
        assert f"mdmrl run RECIPE --accelerate-config {rel}" in text, name
        assert f"accelerate launch --config_file {rel} -m mdmrl run RECIPE" in text, name
        assert rel in running, name


def _cli(tmp_path, capsys, config: str, *extra: str) -> tuple[int, str]:
    recipe = tmp_path / "toy.toml"
    recipe.write_text(TOY_RECIPE)
    code = main(["run", str(recipe), "--run-dir", str(tmp_path / "r"), "--accelerate-config", config, *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "file not found (shipped configs: configs/accelerate/*.yaml)"),
        ("distributed_type: [unclosed\n", "not a valid accelerate config"),
        ("distributed_type: MULTI_GPU\nnum_procesess: 2\n", "not a valid accelerate config"),
        ("distributed_type: NO_SUCH_ENGINE\n", "not a valid accelerate config"),
        ("distributed_type: MULTI_GPU\nmixed_precision: bf16\n", "add --set train.mixed_precision=bf16"),
    ],
    ids=["missing", "bad-yaml", "unknown-key", "unknown-engine", "mixed-precision"],
)
def test_a_bad_config_file_is_one_line(toy_registry, tmp_path, capsys, content, fragment):
    path = tmp_path / "acc.yaml"
    if content is not None:
        path.write_text(content)
    code, err = _cli(tmp_path, capsys, str(path))
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and f"--accelerate-config {path}: " in lines[0], err
    assert fragment in lines[0] and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("deepspeed") is not None, reason="DeepSpeed is installed"
)
def test_deepspeed_configs_without_deepspeed_are_one_line(toy_registry, tmp_path, capsys, monkeypatch):
    """DeepSpeed is an optional extra: both launch paths name it in one line, the CLI
    before starting processes, the engine when ``accelerate launch`` selected it."""
    for name in ("zero2", "zero3"):
        code, err = _cli(
            tmp_path, capsys, str(CONFIGS / f"{name}.yaml"), "--set", "train.mixed_precision=bf16"
        )
        assert code == 2 and err.count("\n") == 1, err
        assert "DeepSpeed, which is not installed; install it with: pip install 'mdmrl[deepspeed]'" in err
    from mdmrl.distributed import setup

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match=r"pip install 'mdmrl\[deepspeed\]'"):
        setup()


def test_fsdp_without_a_gpu_is_one_line(toy_registry, tmp_path, capsys, monkeypatch):
    """accelerate runs FSDP on GPUs only (on CPU it would quietly run DDP): the CLI and
    the engine say so instead."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: FSDP can run")
    code, err = _cli(tmp_path, capsys, str(CONFIGS / "fsdp.yaml"), "--set", "train.mixed_precision=bf16")
    assert code == 2 and "FSDP runs on GPUs only" in err and err.count("\n") == 1, err
    from mdmrl.distributed import setup

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match="selects FSDP, which accelerate runs on GPUs only"):
        setup()


def test_the_launch_mixed_precision_must_be_the_recipe_s(monkeypatch):
    from mdmrl.distributed import setup

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(UserError, match="train.mixed_precision is 'no'"):
        setup("no")
    assert setup("bf16").accelerator.mixed_precision == "bf16"


SHAPES = [
    str(ROOT / "recipes" / "shapes" / "naive_grpo.toml"),
    "--no-progress",
    *(
        "--set",
        "train.iterations=2",
        "--set",
        "train.model.batch_size=4",
        "--set",
        "train.model.group_size=2",
    ),
    *("--set", "sampler.steps=4", "--set", "eval.before=false", "--set", "eval.after=false"),
    *("--set", 'device="cpu"', "--set", "logging.image_every=0", "--set", "logging.tensorboard=false"),
]


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def test_both_launch_paths_run_two_processes(tmp_path):
    """The shapes recipe (2 iterations, tiny batches) through ``mdmrl run
    --accelerate-config configs/accelerate/cpu.yaml`` and through ``accelerate launch
    --config_file configs/accelerate/cpu.yaml -m mdmrl run``: two processes under DDP,
    the same metrics."""
    from test_distributed import _free_port

    env = {k: v for k, v in os.environ.items() if k != "MDMRL_LOAD_PLUGINS"}
    env["OMP_NUM_THREADS"] = "1"
    config = str(CONFIGS / "cpu.yaml")
    ours = [sys.executable, "-m", "mdmrl", "run", *SHAPES, "--accelerate-config", config]
    theirs = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]
    theirs += ["--main_process_port", str(_free_port()), "-m", "mdmrl", "run", *SHAPES]
    rows = []
    for name, cmd in (("ours", ours), ("theirs", theirs)):
        run_dir = tmp_path / name
        proc = subprocess.run(
            [*cmd, "--run-dir", str(run_dir)], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "2 processes; accelerate MULTI_CPU wraps the trained modules in DistributedDataParallel" in (
            proc.stderr
        ), proc.stderr[-3000:]
        rows.append(_rows(run_dir))
    assert len(rows[0]) == 2 and rows[0] == rows[1]


def test_num_processes_and_a_config_are_one_or_the_other(toy_registry, tmp_path, capsys):
    code, err = _cli(tmp_path, capsys, str(CONFIGS / "cpu.yaml"), "--num-processes", "2")
    assert code == 2 and "--num-processes and --accelerate-config: give one" in err and err.count("\n") == 1
