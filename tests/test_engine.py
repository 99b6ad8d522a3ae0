import json
import math

import pytest
import torch

from mdmrl import checkpoint as ckpt
from mdmrl.engine import phase_plan
from mdmrl.recipe import TrainSpec
from mdmrl.runner import run


def test_phase_plan_alternating_and_modes():
    t = TrainSpec(mode="alternating", cycles=2, model_iterations=2, schedule_iterations=1)
    assert phase_plan(t) == [
        ("model", 0),
        ("model", 0),
        ("schedule", 0),
        ("model", 1),
        ("model", 1),
        ("schedule", 1),
    ]
    t.schedule_first = True
    assert [p for p, _ in phase_plan(t)][:3] == ["schedule", "model", "model"]
    assert phase_plan(TrainSpec(mode="naive", iterations=3)) == [("model", 0)] * 3
    assert phase_plan(TrainSpec(mode="joint", iterations=2)) == [("joint", 0)] * 2
    assert phase_plan(TrainSpec(mode="schedule_only", iterations=1)) == [("schedule", 0)]


def test_full_run_writes_the_run_directory(toy_registry, toy_recipe, tmp_path, capsys):
    rd = run(str(toy_recipe), str(tmp_path / "run"), [], progress=False)
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["phase"] for r in rows] == ["model", "model", "schedule"] * 2
    for key in (
        "reward_mean",
        "reward/toy-count_mean",
        "ratio_mean",
        "time_rollout",
        "time_update",
        "action/remask_ratio/t00",
        "grad_norm_model",
    ):
        assert key in rows[0], key
    assert "grad_norm_schedule" in rows[2] and "grad_norm_model" not in rows[2]
    header = (rd / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "reward_mean" in header
    assert (rd / "recipe.toml").read_text().startswith("# Resolved recipe")
    env = json.loads((rd / "environment.json").read_text())
    assert env["packages"]["torch"] == torch.__version__.split("+")[0] or env["packages"]["torch"]
    assert sorted(p.name for p in (rd / "images").iterdir()) == [
        "iter_000002.png",
        "iter_000004.png",
        "iter_000006.png",
    ]
    assert [p.name for p in ckpt.list_checkpoints(rd / "checkpoints")] == ["iter_000005", "iter_000006"]
    assert (rd / "eval" / "base@3.json").is_file() and (rd / "eval" / "trained@3.json").is_file()
    assert (rd / "plots" / "rewards.png").is_file() and (rd / "plots" / "schedule.png").is_file()
    summary = (rd / "eval" / "summary.md").read_text()
    assert "| overall |" in summary and "gain" in summary
    assert "Held-out evaluation at 3 steps" in capsys.readouterr().out


def test_training_changes_only_the_phase_parameters(toy_registry, toy_recipe, tmp_path):
    from mdmrl.build import build_parts
    from mdmrl.engine import Trainer
    from mdmrl.recipe import load

    loaded = load(toy_recipe)
    parts = build_parts(loaded)
    tr = Trainer(loaded, parts, tmp_path, torch.device("cpu"))
    bb0 = {k: v.clone() for k, v in parts.backbone.state_dict().items()}
    s0 = parts.schedule.bias.detach().clone()
    row = tr.iterate()  # model phase
    assert row["phase"] == "model"
    assert any(not torch.equal(bb0[k], v) for k, v in parts.backbone.state_dict().items())
    assert torch.equal(parts.schedule.bias.detach(), s0)
    tr.iterate()
    bb1 = {k: v.clone() for k, v in parts.backbone.state_dict().items()}
    row = tr.iterate()  # schedule phase
    assert row["phase"] == "schedule"
    assert all(torch.equal(bb1[k], v) for k, v in parts.backbone.state_dict().items())
    assert not torch.equal(parts.schedule.bias.detach(), s0)


def test_nan_rewards_skip_updates_and_stop_with_the_last_good_checkpoint(toy_registry, toy_recipe, tmp_path):
    text = toy_recipe.read_text().replace('name = "toy-count"', 'name = "toy-nan"').replace("target = 1", "")
    toy_recipe.write_text(text)
    with pytest.raises(SystemExit) as exc:
        run(str(toy_recipe), str(tmp_path / "nan"), ["train.max_bad_updates=2"], progress=False)
    assert exc.value.code == 3
    rows = [json.loads(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["bad_update"] == 1.0 for r in rows)
    assert ckpt.list_checkpoints(tmp_path / "nan" / "checkpoints") == []


def test_existing_run_dir_is_refused_without_overwrite(toy_registry, toy_recipe, tmp_path):
    from mdmrl.errors import UserError

    rd = tmp_path / "exists"
    rd.mkdir()
    (rd / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="already exists"):
        run(str(toy_recipe), str(rd), [], progress=False)
    assert (rd / "keep.txt").read_text() == "precious"


def test_reference_schedule_is_evaluated_and_reported(toy_registry, toy_recipe, tmp_path, capsys):
    """[eval.reference] evaluates the base model under a second, fixed schedule and
    the summary reports the trained policy's gain over it as well."""
    from mdmrl.recipe import load

    text = toy_recipe.read_text().replace(
        'name = "toy-learned"\n', 'name = "toy-learned"\noptions = { init_bias = 2.0 }\n'
    )
    toy_recipe.write_text(text + '[eval.reference]\nname = "toy-cosine"\n')
    rd = run(str(toy_recipe), str(tmp_path / "run"), [], progress=False)
    ref = json.loads((rd / "eval" / "reference@3.json").read_text())
    base = json.loads((rd / "eval" / "base@3.json").read_text())
    # the reference ran the fixed cosine schedule, the base the (shifted) learned one
    cosine = [math.cos((t + 1) / 3 * math.pi / 2) for t in range(3)]
    assert ref["actions"]["remask_ratio"] == pytest.approx(cosine, abs=1e-6)
    assert base["actions"]["remask_ratio"][0] > cosine[0] + 0.05
    summary = (rd / "eval" / "summary.md").read_text()
    assert "reference total" in summary.splitlines()[3]  # the table header has the column
    assert "base under the reference schedule (toy-cosine)" in summary
    assert load(rd / "recipe.toml").recipe.eval.reference.name == "toy-cosine"  # resumable


def test_reference_schedule_must_be_fixed(toy_registry, toy_recipe):
    from mdmrl.errors import ConfigError
    from mdmrl.recipe import load

    toy_recipe.write_text(toy_recipe.read_text() + '[eval.reference]\nname = "toy-learned"\n')
    with pytest.raises(ConfigError, match="eval.reference.name: 'toy-learned' is a learned schedule"):
        load(toy_recipe)
    toy_recipe.write_text(toy_recipe.read_text().replace('"toy-learned"\n', '"nope"\n'))
    with pytest.raises(ConfigError, match="eval.reference.name"):
        load(toy_recipe)


def test_kl_to_the_initial_model_and_the_split_of_an_iteration_are_logged(toy_registry, toy_recipe, tmp_path):
    """The monitor replays each rollout under the frozen initial model: 0 exactly before
    the first update, positive once the model has moved; the schedule phase leaves the
    model (hence the KL's value on the same kind of rollout) alone. Every iteration logs
    the parts of its wall time, and the report plots both."""
    rd = run(str(toy_recipe), str(tmp_path / "run"), [], progress=False)
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl_ref_k3"] == 0.0 and rows[0]["kl_ref_seq"] == 0.0
    assert rows[1]["kl_ref_k3"] > 0.0 and all(r["kl_ref_k3"] > 0.0 for r in rows[1:])
    parts = (
        "time_rollout",
        "time_reward",
        "time_kl",
        "time_prepare",
        "time_replay_backward",
        "time_optimizer",
    )
    for r in rows:
        assert all(r[k] >= 0.0 for k in parts), r
        assert sum(r[k] for k in parts) <= r["time_iteration"] + 1e-6
        assert r["time_replay_backward"] > 0.0 and r["time_optimizer"] > 0.0
    assert (rd / "plots" / "kl.png").is_file() and (rd / "plots" / "timing.png").is_file()


def test_kl_monitor_can_be_turned_off(toy_registry, toy_recipe, tmp_path):
    rd = run(str(toy_recipe), str(tmp_path / "run"), ["logging.kl_every=2"], progress=False)
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert ["kl_ref_k3" in r for r in rows] == [True, False] * 3
    rd = run(str(toy_recipe), str(tmp_path / "off"), ["logging.kl_every=0"], progress=False)
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert not any("kl_ref_k3" in r or "time_kl" in r for r in rows)
    assert not (rd / "plots" / "kl.png").exists()


def test_kl_steps_rotate_through_every_step():
    from mdmrl.engine import kl_steps

    assert kl_steps(8, 0, 5) == list(range(8)) and kl_steps(3, 4, 0) == [0, 1, 2]
    assert kl_steps(8, 2, 0) == [0, 4] and kl_steps(8, 2, 1) == [1, 5] and kl_steps(8, 2, 4) == [0, 4]
    for t, s in ((8, 2), (8, 4), (6, 3), (12, 4)):
        seen = [x for m in range(t) for x in kl_steps(t, s, m)]
        assert sorted(seen) == sorted(list(range(t)) * s), (t, s)


def test_subsampled_kl_averages_to_the_full_measurement(toy_registry, toy_recipe, tmp_path):
    """Over T consecutive measurements, the rotating subset's estimates average to the
    estimate that replays every step (same rollout, same moved model)."""
    from mdmrl import recipe as rc
    from mdmrl.build import build_parts
    from mdmrl.engine import Trainer

    loaded = rc.load(toy_recipe, ["sampler.steps=4", "logging.kl_steps=2"])
    trainer = Trainer(loaded, build_parts(loaded), tmp_path / "r", torch.device("cpu"), log=lambda s: None)
    trainer.iterate()  # moves the model away from the reference
    traj, total, _, _, local, _ = trainer.rollout("model")
    full_cfg = loaded.recipe.logging
    sub = []
    for m in range(4):
        trainer.iteration = m
        sub.append(trainer.kl_to_reference(traj, local, total.numel()))
    full_cfg.kl_steps = 0
    full = trainer.kl_to_reference(traj, local, total.numel())
    assert full["kl_ref_k3"] > 0
    for key in ("kl_ref_k3", "kl_ref_seq"):
        assert sum(x[key] for x in sub) / 4 == pytest.approx(full[key], rel=1e-5)
        assert len({round(x[key], 9) for x in sub}) > 1  # the subsets differ


@pytest.mark.parametrize(("trackers", "tb_written"), [("[]", False), ('["tensorboard"]', True)])
def test_the_recipe_trackers_reach_the_metrics_log(toy_registry, toy_recipe, tmp_path, trackers, tb_written):
    """The engine hands ``logging.trackers`` itself to the metrics log: a run directory
    without a resolved recipe.toml (benchmarks, library use) gets the recipe's trackers,
    not the default ones."""
    from mdmrl import recipe as rc
    from mdmrl.build import build_parts
    from mdmrl.engine import Trainer

    overrides = ["train.cycles=1", "logging.tensorboard=true", f"logging.trackers={trackers}"]
    loaded = rc.load(toy_recipe, overrides)
    (tmp_path / "r").mkdir()
    trainer = Trainer(loaded, build_parts(loaded), tmp_path / "r", torch.device("cpu"), log=lambda s: None)
    assert trainer.train() == "done"
    assert (tmp_path / "r" / "metrics.jsonl").is_file()
    assert (tmp_path / "r" / "tb").is_dir() == tb_written
