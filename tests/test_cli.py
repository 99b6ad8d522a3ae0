"""The command line: listing, validation, and a corpus of bad input. Every bad input
gives one line on stderr naming the field or file, exit code 2, no traceback, and no
run directory left behind."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from toy_plugin import TOY_RECIPE

from mdmrl.cli import main

TESTS = Path(__file__).resolve().parent


def _recipe(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return str(p)


def _sub(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


# (description, recipe text transform, extra args, expected fragment of the error line)
BAD_RECIPES = [
    ("syntax error", lambda t: t + "\n[train\n", [], "TOML syntax error"),
    ("unknown top-level key", lambda t: "sede = 1\n" + t, [], "sede: unknown key"),
    (
        "unknown train key",
        lambda t: _sub(t, "[train]\n", "[train]\nlearning_rate = 1\n"),
        [],
        "train.learning_rate: unknown key",
    ),
    (
        "wrong type",
        lambda t: _sub(t, "seed = 3", 'seed = "three"'),
        [],
        "seed: expected int, got string 'three'",
    ),
    ("negative seed", lambda t: _sub(t, "seed = 3", "seed = -1"), [], "seed: -1 is below the minimum 0"),
    (
        "group size 1",
        lambda t: _sub(t, "group_size = 4", "group_size = 1"),
        [],
        "train.model.group_size: 1 is below the minimum 2",
    ),
    (
        "negative lr",
        lambda t: _sub(t, "lr = 0.05", "lr = -0.1"),
        [],
        "train.model.lr: -0.1 must be greater than 0.0",
    ),
    (
        "zero steps",
        lambda t: _sub(t, "steps = 3", "steps = 0"),
        [],
        "sampler.steps: 0 is below the minimum 1",
    ),
    (
        "bad mode",
        lambda t: _sub(t, 'mode = "alternating"', 'mode = "both"'),
        [],
        "train.mode: 'both' is not allowed",
    ),
    (
        "batch not multiple of G",
        lambda t: _sub(t, "batch_size = 8", "batch_size = 10"),
        [],
        "not a multiple of",
    ),
    (
        "unknown backbone",
        lambda t: _sub(t, 'name = "tiny"', 'name = "tinny"'),
        [],
        "Unknown backbone 'tinny'. Available: tiny.",
    ),
    (
        "unknown sampler",
        lambda t: _sub(t, 'name = "toy-sampler"', 'name = "confidnce"'),
        [],
        "Unknown sampler 'confidnce'",
    ),
    (
        "unknown rewarder",
        lambda t: _sub(t, 'name = "toy-count"', 'name = "nope"'),
        [],
        "rewards[0].name: Unknown rewarder 'nope'",
    ),
    (
        "unknown objective",
        lambda t: _sub(t, 'name = "toy-pg"', 'name = "ppo"'),
        [],
        "Unknown objective 'ppo'",
    ),
    (
        "unknown prompt source",
        lambda t: _sub(t, 'name = "toy-prompts"', 'name = "x"'),
        [],
        "Unknown prompts 'x'",
    ),
    (
        "plugin option unknown",
        lambda t: _sub(t, "target = 1", "targt = 1"),
        [],
        "rewards[0].options.targt: unknown key",
    ),
    (
        "plugin option range",
        lambda t: _sub(t, "target = 1", "target = -3"),
        [],
        "rewards[0].options.target: -3 is below",
    ),
    (
        "plugin option type",
        lambda t: _sub(t, 'name = "toy-pg"', 'name = "toy-pg"\noptions = { clip_eps = "x" }'),
        [],
        "objective.options.clip_eps: expected float",
    ),
    (
        "clip eps zero",
        lambda t: _sub(t, 'name = "toy-pg"', 'name = "toy-pg"\noptions = { clip_eps = 0.0 }'),
        [],
        "must be greater than 0.0",
    ),
    (
        "no rewards",
        lambda t: t.replace(
            '[[rewards]]\nname = "toy-count"\nweight = 1.0\n[rewards.options]\ntarget = 1\n', ""
        ),
        [],
        "rewards: required, missing",
    ),
    ("zero weights", lambda t: _sub(t, "weight = 1.0", "weight = 0.0"), [], "every weight is 0"),
    (
        "missing backbone",
        lambda t: _sub(t, '[backbone]\nname = "tiny"\n', ""),
        [],
        "backbone: required, missing",
    ),
    (
        "rewards not a list",
        lambda t: t.replace("[[rewards]]", "[rewards]").replace("[rewards.options]\ntarget = 1\n", ""),
        [],
        "rewards: expected list of table",
    ),
    ("bad device", lambda t: _sub(t, 'device = "cpu"', 'device = "tpu"'), [], "device: 'tpu' is not allowed"),
    (
        "timestep fraction > 1",
        lambda t: _sub(t, "[train]\n", "[train]\ntimestep_fraction = 1.5\n"),
        [],
        "train.timestep_fraction: 1.5 is above the maximum 1.0",
    ),
    (
        "betas wrong length",
        lambda t: _sub(t, "lr = 0.05", "lr = 0.05\nbetas = [0.9]"),
        [],
        "train.model.betas: expected 2 numbers",
    ),
    (
        "eval steps zero",
        lambda t: _sub(t, "steps = [3]", "steps = [0]"),
        [],
        "eval.steps[0]: 0 is below the minimum 1",
    ),
    ("bad override key", lambda t: t, ["--set", "train.lrr=1"], "train.lrr: unknown key"),
    ("override without =", lambda t: t, ["--set", "train.lr"], "--set 'train.lr': expected key.path=value"),
    ("override wrong type", lambda t: t, ["--set", "seed=abc"], "seed: expected int, got string 'abc'"),
    (
        "schedule phase with a fixed schedule",
        lambda t: _sub(t, 'name = "toy-learned"', 'name = "toy-cosine"'),
        [],
        "train.mode: 'alternating' trains the schedule, but schedule 'toy-cosine' is a fixed one",
    ),
    (
        "rewards as strings",
        lambda t: t.replace(
            '[[rewards]]\nname = "toy-count"\nweight = 1.0\n[rewards.options]\ntarget = 1\n', ""
        ).replace("seed = 3", 'seed = 3\nrewards = ["toy-count"]'),
        [],
        "rewards[0]: expected a table, got string 'toy-count'",
    ),
    (
        "negative weight without penalty",
        lambda t: _sub(t, "weight = 1.0", "weight = -1.0"),
        [],
        "rewards[0].weight: -1.0 is negative; set penalty = true",
    ),
    (
        "penalty with a positive weight",
        lambda t: _sub(t, "weight = 1.0", "weight = 1.0\npenalty = true"),
        [],
        "rewards[0].penalty: true, but weight 1.0 is not negative",
    ),
    (
        "nan weight",
        lambda t: _sub(t, "weight = 1.0", "weight = nan"),
        [],
        "rewards[0].weight: must be a finite",
    ),
    (
        "iterations in alternating mode",
        lambda t: _sub(t, "cycles = 2", "cycles = 2\niterations = 8"),
        [],
        'train.iterations: has no effect in mode "alternating"',
    ),
    (
        "iterations in alternating mode, from --set",
        lambda t: t,
        ["--set", "train.iterations=8"],
        'train.iterations: has no effect in mode "alternating"',
    ),
    (
        "cycles in naive mode",
        lambda t: _sub(t, 'mode = "alternating"', 'mode = "naive"').replace(
            "[train.schedule]\nlr = 0.05\ngroup_size = 4\nbatch_size = 8\n", ""
        ),
        [],
        'train.cycles: has no effect in mode "naive"',
    ),
    (
        "schedule optimizer in naive mode",
        lambda t: t,
        ["--set", "train.mode=naive", "--set", "train.schedule.lr=0.1"],
        'train.schedule: has no effect in mode "naive"',
    ),
    (
        "learned schedule as the evaluation reference",
        lambda t: _sub(t, "seeds = 2", 'seeds = 2\nreference = { name = "toy-learned" }'),
        [],
        "eval.reference.name: 'toy-learned' is a learned schedule; a fixed schedule is needed here",
    ),
    (
        "reference options unknown",
        lambda t: _sub(t, "seeds = 2", 'seeds = 2\nreference = { name = "toy-cosine", options = { s = 3 } }'),
        [],
        "eval.reference.options.s: unknown key",
    ),
    (
        "duplicate key",
        lambda t: _sub(t, "seed = 3", "seed = 3\nseed = 4"),
        [],
        "Cannot overwrite a value (at line 3, column 9): 'seed = 4'",
    ),
    (
        "mixed precision choice",
        lambda t: _sub(t, "[train]\n", '[train]\nmixed_precision = "fp8"\n'),
        [],
        "train.mixed_precision: 'fp8' is not allowed",
    ),
]


@pytest.mark.parametrize(
    ("desc", "transform", "extra", "fragment"), BAD_RECIPES, ids=[b[0] for b in BAD_RECIPES]
)
def test_bad_recipe_gives_one_clear_line(toy_registry, tmp_path, capsys, desc, transform, extra, fragment):
    path = _recipe(tmp_path, transform(TOY_RECIPE))
    run_dir = tmp_path / "run"
    code = main(["run", path, "--run-dir", str(run_dir), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert fragment in err, err
    assert "Traceback" not in err
    assert err.startswith("mdmrl: error: ")
    assert not run_dir.exists(), "a failed start must leave no run directory"


BAD_COMMANDS = [
    (["run", "missing.toml"], "missing.toml: recipe file not found"),
    (["run", "."], "is a directory"),
    (["validate", "nope.toml"], "nope.toml: recipe file not found"),
    (["run", "--resume", "no_such_run"], "no_such_run: not a run directory"),
    (["eval", "--checkpoint", "no/such/ckpt"], "no/such/ckpt: checkpoint not found"),
    (["report", "no_such_run"], "no_such_run: not a run directory"),
    (["run", "--num-processes", "0", "x.toml"], "--num-processes: 0 is not allowed"),
    (["pretrain", "none.toml"], "none.toml: recipe file not found"),
]


@pytest.mark.parametrize(("argv", "fragment"), BAD_COMMANDS, ids=[" ".join(a[0]) for a in BAD_COMMANDS])
def test_bad_command_line(toy_registry, tmp_path, capsys, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err, err


def test_existing_run_dir_and_unwritable_parent(toy_registry, tmp_path, capsys):
    path = _recipe(tmp_path, TOY_RECIPE)
    existing = tmp_path / "old"
    existing.mkdir()
    (existing / "metrics.jsonl").write_text("{}\n")
    assert main(["run", path, "--run-dir", str(existing), "--no-progress"]) == 2
    assert "already exists; use --resume" in capsys.readouterr().err
    assert (existing / "metrics.jsonl").read_text() == "{}\n"
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert main(["run", path, "--run-dir", str(ro / "x"), "--no-progress"]) == 2
        assert "not writable" in capsys.readouterr().err


def test_all_problems_are_listed_at_once(toy_registry, tmp_path, capsys):
    text = _sub(_sub(TOY_RECIPE, "seed = 3", "seed = -1"), 'name = "tiny"', 'name = "tinny"')
    assert main(["validate", _recipe(tmp_path, text)]) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err and "seed: -1" in err and "Unknown backbone 'tinny'" in err


def test_debug_shows_the_traceback(toy_registry, tmp_path):
    from mdmrl.errors import UserError

    with pytest.raises(UserError):
        main(["--debug", "validate", str(tmp_path / "none.toml")])


def test_validate_and_plugins_list(toy_registry, tmp_path, capsys):
    assert main(["validate", _recipe(tmp_path, TOY_RECIPE)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "backbone=tiny" in out
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "toy-sampler" in out and "sampler" in out and "mdmrl-tests" in out


def test_eval_and_sample_commands(toy_registry, tmp_path, capsys):
    path = _recipe(tmp_path, TOY_RECIPE)
    prompts = tmp_path / "p.txt"
    prompts.write_text("# comment\nred big\n\nblue small\nstyleA\tgreen big\n")
    assert main(["eval", path, "--prompts", str(prompts), "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "| overall |" in out and "| styleA |" in out
    assert main(["sample", path, "--prompt", "red big", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    # a folder (no suffix) receives samples.png; another suffix is one line, exit 2
    assert main(["sample", path, "--prompt", "red big", "--out", str(tmp_path / "dir")]) == 0
    assert (tmp_path / "dir" / "samples.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["sample", path, "--prompt", "red big", "--out", str(tmp_path / "s.jpg")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and ".png" in err and err.strip().count("\n") == 0


def test_cli_subprocess_exit_code_and_single_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mdmrl", "validate", str(tmp_path / "x.toml")],
        capture_output=True,
        text=True,
        env={**os.environ, "MDMRL_LOAD_PLUGINS": ""},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "recipe file not found" in proc.stderr


def test_eval_writes_geneval_and_dpg_layouts(toy_registry, tmp_path, capsys):
    import json as _json

    path = _recipe(tmp_path, TOY_RECIPE)
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text(
        '{"tag": "single_object", "include": [], "prompt": "red big"}\n'
        '{"tag": "colors", "include": [], "prompt": "blue small"}\n'
    )
    out = tmp_path / "geneval"
    assert (
        main(
            [
                "eval",
                path,
                "--prompts",
                str(meta),
                "--seeds",
                "2",
                "--write-images",
                str(out),
                "--layout",
                "geneval",
            ]
        )
        == 0
    )
    assert "| single_object |" in capsys.readouterr().out
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.*")) == [
        "00000/metadata.jsonl",
        "00000/samples/0000.png",
        "00000/samples/0001.png",
        "00001/metadata.jsonl",
        "00001/samples/0000.png",
        "00001/samples/0001.png",
    ]
    assert _json.loads((out / "00001" / "metadata.jsonl").read_text())["tag"] == "colors"
    dpg = tmp_path / "dpg_prompts"
    dpg.mkdir()
    (dpg / "a1.txt").write_text("red big")
    (dpg / "b2.txt").write_text("green small")
    out2 = tmp_path / "dpg"
    assert (
        main(
            [
                "eval",
                path,
                "--prompts",
                str(dpg),
                "--seeds",
                "4",
                "--write-images",
                str(out2),
                "--layout",
                "dpg",
            ]
        )
        == 0
    )
    from PIL import Image

    assert sorted(p.name for p in out2.iterdir()) == ["a1.png", "b2.png"]
    w, h = Image.open(out2 / "a1.png").size
    assert (w, h) == (2 * 4, 2 * 3)  # 2x2 tiles of the 3x4 toy images


ROOT = TESTS.parent


def test_validate_accepts_every_recipe_kind_and_prints_the_plan(capsys):
    assert main(["validate", str(ROOT / "recipes/shapes/co_grpo.toml")]) == 0
    out = capsys.readouterr().out
    assert "plan: 72 iterations: 3 cycles × (16 model + 8 schedule)" in out
    assert main(["validate", str(ROOT / "recipes/shapes/naive_grpo.toml")]) == 0
    assert "plan: 12 iterations: naive mode (model only)" in capsys.readouterr().out
    assert main(["validate", str(ROOT / "recipes/shapes/pretrain.toml")]) == 0
    out = capsys.readouterr().out
    assert "valid pretraining recipe" in out and "backbone=shapes-mdm" in out and "steps=10000" in out


def test_validate_lists_every_problem_of_a_pretraining_recipe(tmp_path, capsys):
    text = (ROOT / "recipes/shapes/pretrain.toml").read_text()
    text = _sub(text, 'output = "plugins/shapes/weights/shapes-mdm.safetensors"\n', "colour = 1\n")
    text = _sub(_sub(text, "steps = 10000", "steps = -1"), "lr = 0.002", 'lr = "fast"\nlayrs = 2')
    assert main(["validate", _recipe(tmp_path, text)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[1:] == [  # every problem, nested options included, each with its path
        "  pretrain.colour: unknown key; allowed keys here: backbone, output, options",
        "  pretrain.output: required, missing",
        "  pretrain.options.layrs: unknown key; allowed keys here: "
        + err.split("layrs: unknown key; allowed keys here: ")[1].splitlines()[0],
        "  pretrain.options.steps: -1 is below the minimum 1",
        "  pretrain.options.lr: expected float, got string 'fast'",
    ]
    assert err.startswith("mdmrl: error: ") and "5 problems:" in err.splitlines()[0]


def test_each_command_names_the_other_recipe_kind(tmp_path, capsys):
    pretrain = str(ROOT / "recipes/shapes/pretrain.toml")
    assert main(["run", pretrain, "--run-dir", str(tmp_path / "r")]) == 2
    assert (
        f"a pretraining recipe ([pretrain]); run it with: mdmrl pretrain {pretrain}"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "r").exists()
    training = str(ROOT / "recipes/shapes/co_grpo.toml")
    assert main(["pretrain", training]) == 2
    assert "not a pretraining recipe (no [pretrain] table); run it with: mdmrl run" in capsys.readouterr().err


def test_a_recipe_that_is_not_utf8_names_the_line(toy_registry, tmp_path, capsys):
    path = tmp_path / "r.toml"
    path.write_bytes(TOY_RECIPE.encode().replace(b'device = "cpu"', b'device = "c\xffpu"'))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"mdmrl: error: {path}: not a UTF-8 text file (invalid byte at line 3)\n"


def test_a_reader_that_stops_early_gets_no_traceback():
    # `mdmrl schema | true`: the reader is gone before the first write (as `| head` is
    # gone after its first lines of a long output)
    proc = subprocess.run(
        f"'{sys.executable}' -m mdmrl schema | true; echo \"${{PIPESTATUS[0]}}\"",
        shell=True,
        capture_output=True,
        text=True,
        executable="/bin/bash",
    )
    assert proc.stderr == "", proc.stderr
    assert proc.stdout == "0\n"
