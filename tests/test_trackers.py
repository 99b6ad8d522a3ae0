"""Metrics reach TensorBoard and Weights & Biases (offline, no network) through
accelerate's tracker classes; metrics.jsonl stays the record; a resumed run does not
repeat a tracker row; only the main process logs."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from toy_plugin import TOY_RECIPE

from mdmrl import recipe as rc
from mdmrl import tracking
from mdmrl.errors import UserError
from mdmrl.rundir import MetricsLog

TESTS = Path(__file__).resolve().parent
#: scalars compared between metrics.jsonl and the trackers (timings differ run to run)
COMPARED = ("reward_mean", "reward_std", "loss", "adv_abs_mean")


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B in offline mode, writing under a temporary WANDB_DIR."""
    folder = tmp_path / "wandb-dir"
    folder.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return folder


def tensorboard_scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value as TensorBoard shows them (events purged by a later writer's
    purge_step are dropped, as TensorBoard drops them). Fails on a repeated step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: repeated steps {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out


def wandb_rows(wandb_dir: Path) -> list[list[dict]]:
    """The history rows of every offline W&B run folder under ``wandb_dir``, one list
    per folder, in the order of their first step (folder names carry a start time to the
    second only, which does not order two starts in the same second)."""
    files = glob.glob(str(wandb_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    runs = [tracking.wandb_history(f) for f in files]
    return sorted(runs, key=lambda rows: rows[0]["_step"] if rows else -1)


def jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_trackers_match(run_dir: Path, wandb_dir: Path) -> list[list[dict]]:
    """TensorBoard and W&B (all offline folders together) hold every row of
    metrics.jsonl exactly once, with its values."""
    rows = jsonl(run_dir)
    steps = [r["iteration"] for r in rows]
    tb = tensorboard_scalars(run_dir / "tb")
    runs = wandb_rows(wandb_dir)
    sent = [r for run in runs for r in run]
    assert [r["_step"] for r in sent] == steps  # each step once, in order
    for row, logged in zip(rows, sent):
        for key in COMPARED:
            if key in row:
                assert tb[key][row["iteration"]] == pytest.approx(row[key], rel=1e-6)
                assert logged[key] == pytest.approx(row[key], rel=1e-12)
        assert "phase" not in logged  # numbers only
    for key in COMPARED:
        assert sorted(tb.get(key, {})) == [r["iteration"] for r in rows if key in r]
    return runs


# ---------------------------------------------------------------------- the recipe field


def test_resolve_keeps_the_tensorboard_switch():
    assert tracking.resolve(["tensorboard"]) == ["tensorboard"]
    assert tracking.resolve(["tensorboard", "wandb", "tensorboard"]) == ["tensorboard", "wandb"]
    # logging.tensorboard = false (recipes written before logging.trackers) turns TensorBoard off
    assert tracking.resolve(["tensorboard", "wandb"], tensorboard=False) == ["wandb"]
    assert tracking.resolve(["tensorboard"], tensorboard=False) == []
    with pytest.raises(UserError, match="logging.trackers: 'neptune' is not a tracker"):
        tracking.resolve(["neptune"])


def test_recipe_accepts_trackers_and_names_a_wrong_one():
    path = TESTS.parent / "recipes" / "shapes" / "co_grpo.toml"
    loaded = rc.load(path, ['logging.trackers=["tensorboard", "wandb"]'])
    assert loaded.recipe.logging.trackers == ["tensorboard", "wandb"]
    assert rc.LoggingSpec().trackers == ["tensorboard"]
    with pytest.raises(UserError) as err:
        rc.load(path, ['logging.trackers=["tensorbord"]'])
    assert "logging.trackers[0]: 'tensorbord' is not allowed; choose one of: tensorboard, wandb" in str(
        err.value
    )


def test_the_run_directory_recipe_names_the_trackers(tmp_path):
    (tmp_path / "recipe.toml").write_text(
        '[logging]\ntensorboard = false\ntrackers = ["tensorboard", "wandb"]\n'
    )
    assert tracking.from_run_dir(tmp_path) == ["wandb"]
    assert tracking.from_run_dir(tmp_path / "absent") == ["tensorboard"]
    assert tracking.from_run_dir(tmp_path / "absent", tensorboard=False) == []


def test_a_missing_tracker_package_is_one_line(tmp_path, monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(UserError) as err:
        MetricsLog(tmp_path, True, ["tensorboard", "wandb"])
    assert str(err.value) == (
        "logging.trackers: 'wandb' needs the wandb package, which is not installed (pip install -e '.[wandb]')"
    )


# ---------------------------------------------------------------------- MetricsLog


def _row(i: int) -> dict:
    return {"iteration": i, "phase": "model", "reward_mean": 0.1 * i, "loss": -0.01 * i, "bad_update": 0.0}


def test_rows_reach_both_trackers_and_a_resume_repeats_none(tmp_path, wandb_offline):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log = MetricsLog(run_dir, True, ["tensorboard", "wandb"])
    log.truncate(1)
    for i in (1, 2, 3, 4):
        log.append(_row(i))
    log.close()  # (a killed run does not close; the resume below does not rely on it)

    # resumed from the checkpoint after iteration 2: rows 3 and 4 are written again,
    # with a changed value, to see which copy each tracker keeps
    log = MetricsLog(run_dir, True, ["tensorboard", "wandb"])
    log.truncate(3)
    for i in (3, 4, 5):
        log.append({**_row(i), "reward_mean": 1.0 + i})
    log.close()

    rows = jsonl(run_dir)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    tb = tensorboard_scalars(run_dir / "tb")
    # TensorBoard shows the rows of metrics.jsonl: the events of 3 and 4 written before
    # the resume are purged
    assert tb["reward_mean"] == pytest.approx({1: 0.1, 2: 0.2, 3: 4.0, 4: 5.0, 5: 6.0})
    assert "phase" not in tb and "iteration" not in tb
    first, second = wandb_rows(wandb_offline)
    # W&B keeps what it was sent: the resumed start sends only the steps after the last one
    assert [r["_step"] for r in first] == [1, 2, 3, 4] and [r["_step"] for r in second] == [5]
    assert [r["reward_mean"] for r in first + second] == pytest.approx([0.1, 0.2, 0.3, 0.4, 6.0])
    run_id = json.loads((run_dir / tracking.STATE_FILE).read_text())["wandb_id"]
    # the run id from each history file's name (run-<id>.wandb): a folder's name gains a
    # "-1" suffix when the resumed start falls in the same second as the first
    runs = {
        Path(p).stem.removeprefix("run-")
        for p in glob.glob(str(wandb_offline / "wandb" / "offline-run-*" / "run-*.wandb"))
    }
    assert runs == {run_id}  # one W&B run, continued


def test_without_trackers_nothing_but_the_metrics_files(tmp_path):
    log = MetricsLog(tmp_path, False)
    log.append(_row(1))
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "metrics.jsonl"]


# ---------------------------------------------------------------------- mdmrl run

BOOT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from toy_plugin import TOYS
from mdmrl import plugins
plugins.get_registry().register_plugin(TOYS, "toys", "mdmrl-tests", "0")
import mdmrl.rundir as rd
real_append = rd.MetricsLog.append
count = [0]
def append(self, row):
    real_append(self, row)
    count[0] += 1
    if count[0] == {kill_after}:
        os.kill(os.getpid(), signal.SIGKILL)
rd.MetricsLog.append = append
from mdmrl.cli import main
sys.exit(main(["run", *{args!r}, "--no-progress"]))
"""


def _recipe(tmp_path: Path) -> Path:
    text = TOY_RECIPE.replace(
        "tensorboard = false", 'trackers = ["tensorboard", "wandb"]\ncheckpoint_every = 2'
    ).replace(
        "[eval]\nsteps = [3]\nseeds = 2", "[eval]\nsteps = [3]\nseeds = 1\nbefore = false\nafter = false"
    )
    path = tmp_path / "toy.toml"
    path.write_text(text)
    return path


def _env(wandb_dir: Path) -> dict:
    """The environment of a run's process: offline W&B under ``wandb_dir``, without the
    W&B service address this test process may hold (each run starts its own service),
    and without W&B's system monitor (its process would outlive a start killed with
    SIGKILL)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {
        **env,
        "MDMRL_LOAD_PLUGINS": "",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(wandb_dir),
        "WANDB_X_DISABLE_STATS": "true",
    }


def test_killed_and_resumed_run_logs_every_iteration_once(tmp_path, wandb_offline):
    recipe, run_dir = _recipe(tmp_path), tmp_path / "run"
    # killed after the metrics of iteration 3 (checkpoint after iteration 2): iteration 3 runs twice
    code = BOOT.format(tests=str(TESTS), kill_after=3, args=[str(recipe), "--run-dir", str(run_dir)])
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_env(wandb_offline), capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [r["iteration"] for r in jsonl(run_dir)] == [1, 2, 3]
    code = BOOT.format(tests=str(TESTS), kill_after=-1, args=["--resume", str(run_dir)])
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_env(wandb_offline), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["iteration"] for r in jsonl(run_dir)] == [1, 2, 3, 4, 5, 6]
    # the killed start's rows are in its own folder if W&B's process wrote them before it
    # died; the resumed start sends whatever the folders lack, so every step is there once
    assert_trackers_match(run_dir, wandb_offline)


def test_two_processes_log_from_the_main_process_only(tmp_path, wandb_offline):
    from test_distributed import _free_port

    recipe, run_dir = _recipe(tmp_path), tmp_path / "run"
    launch = "-m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1"
    launch += f" --mixed_precision no --dynamo_backend no --main_process_port {_free_port()}"
    run = ["run", str(recipe), "--run-dir", str(run_dir), "--no-progress"]
    cmd = [sys.executable, *launch.split(), str(TESTS / "toy_main.py"), *run]
    env = {**_env(wandb_offline), "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1
    runs = assert_trackers_match(run_dir, wandb_offline)
    assert len(runs) == 1  # one W&B run: the second process opened none


def test_offline_files_of_a_run_in_start_order_including_same_second_restarts(tmp_path):
    # W&B names a start's folder offline-run-<time>-<id>, adding -<n> when a start of the
    # same run falls in a second that already has a folder
    for name in (
        "offline-run-20261204_061001-abc-10",
        "offline-run-20261204_061001-abc",
        "offline-run-20261204_061001-abc-2",
        "offline-run-20261204_060959-abc",
        "offline-run-20261204_061000-xyz",
    ):
        run_id = name.split("-")[3]
        folder = tmp_path / "wandb" / name
        folder.mkdir(parents=True)
        (folder / f"run-{run_id}.wandb").write_bytes(b"")
    files = tracking.wandb_offline_files(tmp_path, "abc")
    assert [Path(f).parent.name for f in files] == [
        "offline-run-20261204_060959-abc",
        "offline-run-20261204_061001-abc",
        "offline-run-20261204_061001-abc-2",
        "offline-run-20261204_061001-abc-10",
    ]
