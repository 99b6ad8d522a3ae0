"""Where reward models run (``[reward_placement]``): on every process (``rank``), on
the main process only (``device``), or in a reward process (``process``).

Runs of the shapes Co-GRPO recipe (3 iterations of 4 images) give the same rewards and
metrics in every placement and process count; the rewarders are built only where the
placement puts them (builds counted by a launched script that wraps
``mdmrl.build.build_part``); a reward process killed in the middle of a 2-process run
stops both processes with one error line and a checkpoint, and the run resumes to the
metrics of an uninterrupted one once a reward process is back. The client's protocol
(exact scores, images sent only when a rewarder reads them, a silent or gone process,
another recipe's rewards, a garbage frame) is tested against a reward service in a
thread."""

import gc
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import co_grpo_tiny
import pytest
import torch
from safetensors.torch import load_file
from test_distributed import _free_port, launch_cmd
from toy_plugin import MeanOptions, ToyReward
from toys import TinyBackbone

import mdmrl.build
from mdmrl import checkpoint as ckpt
from mdmrl import plugins
from mdmrl.cli import main
from mdmrl.errors import UserError
from mdmrl.hookspecs import hookimpl
from mdmrl.interfaces import GeneratedBatch, Rewarder
from mdmrl.reward_server import READY, RemoteRewarder, RewardServer, RewardService, connect
from mdmrl.rewarding import CompositeRewarder, RewardProcessError

TESTS = Path(__file__).resolve().parent
RECIPE = co_grpo_tiny.RECIPE
SETS = co_grpo_tiny.SETS + [
    "eval.before=false",
    "logging.checkpoint_every=2",
    "logging.image_every=0",
    "logging.kl_every=0",
]
IMAGE_REWARD = '\n[[rewards]]\nname = "test-image-corner"\nweight = 0.25\n'


class ImageCorner(Rewarder):
    """Mean of each image's top-left quarter: a reward that reads the decoded images."""

    name = "test-image-corner"

    def __init__(self, options=None):
        pass

    def score(self, batch):
        images = batch.images
        h, w = images.shape[-2:]
        return images[:, :, : h // 2, : w // 2].float().mean((1, 2, 3)).cpu()


class ImagePlugin:
    @hookimpl
    def register_rewarders(self, register):
        register(ImageCorner)


# The launched processes register the image reward and write a line per rewarder they
# build (rank, name, device) to $MDMRL_TEST_BUILDS, then run mdmrl.
LAUNCHED = """
import os, runpy, sys
sys.path.insert(0, {tests!r})
from test_reward_placement import ImagePlugin
from mdmrl import plugins
import mdmrl.build as build
plugins.get_registry().register_plugin(ImagePlugin(), "placement-tests")
real = build.build_part
def build_part(loaded, path, kind, name, ctx):
    if kind == "rewarder":
        with open(os.environ["MDMRL_TEST_BUILDS"], "a") as f:
            f.write(f"{{os.environ.get('RANK', '0')}} {{name}} {{ctx.device}}\\n")
    return real(loaded, path, kind, name, ctx)
build.build_part = build_part
sys.argv[0] = "mdmrl"
runpy.run_module("mdmrl", run_name="__main__")
"""
# `mdmrl reward-server` that kills itself (SIGKILL) at its n-th scoring request
SERVER_DIES_AT = """
import os, runpy, signal, sys
import mdmrl.reward_server as rs
real, count = rs.RewardService.handle, [0]
def handle(self, header, tensors):
    if header.get("op") == "score":
        count[0] += 1
        if count[0] == {n}:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(self, header, tensors)
rs.RewardService.handle = handle
sys.argv[0] = "mdmrl"
runpy.run_module("mdmrl", run_name="__main__")
"""


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def _weights(run_dir: Path) -> dict:
    return load_file(str(ckpt.list_checkpoints(run_dir / "checkpoints")[-1] / "backbone.safetensors"))


def _evaluation(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval" / "trained@4.json").read_text())


def _sets(extra: list[str]) -> list[str]:
    return [a for s in SETS + extra for a in ("--set", s)]


def _env(builds: Path) -> dict:
    env = {**os.environ, "MDMRL_LOAD_PLUGINS": "shapes,cogrpo", "ACCELERATE_USE_CPU": "1"}
    return {**env, "OMP_NUM_THREADS": "1", "MDMRL_TEST_BUILDS": str(builds)}


def _launch(
    tmp: Path, name: str, args: list[str], timeout: float = 300
) -> tuple[subprocess.CompletedProcess, Path]:
    """Two processes (gloo) running ``mdmrl ARGS`` through LAUNCHED; returns the
    finished process and the file of rewarder builds."""
    script = tmp / "launched.py"
    script.write_text(LAUNCHED.format(tests=str(TESTS)))
    builds = tmp / f"{name}.builds"
    proc = subprocess.run(
        [*launch_cmd(2, script), *args], env=_env(builds), capture_output=True, text=True, timeout=timeout
    )
    return proc, builds


def _run_here(run_dir: Path, extra: list[str], recipe: Path = RECIPE) -> list[str]:
    """One process, in this one; returns the rewarders it built."""
    from mdmrl.runner import run

    built, real = [], mdmrl.build.build_part

    def counting(loaded, path, kind, name, ctx):
        if kind == "rewarder":
            built.append(name)
        return real(loaded, path, kind, name, ctx)

    mdmrl.build.build_part = counting
    try:
        run(str(recipe), str(run_dir), SETS + extra, progress=False)
    finally:
        mdmrl.build.build_part = real
    return built


def _start_server(script: list[str], port: int, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, *script, "reward-server", str(RECIPE), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    line = proc.stdout.readline()
    assert line.startswith(f"{READY}127.0.0.1:{port} "), line
    return proc


# -- runs -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rank_run(tmp_path_factory):
    """The reference: one process, placement rank."""
    run_dir = tmp_path_factory.mktemp("rank") / "run"
    built = _run_here(run_dir, [])
    assert built == ["shapes-alignment", "shapes-quality", "shapes-clean"]
    return run_dir


@pytest.fixture(scope="module")
def two_processes_local(tmp_path_factory):
    """Two processes and the reward process that the main process starts."""
    tmp = tmp_path_factory.mktemp("process2")
    run_dir = tmp / "run"
    args = [
        "run",
        str(RECIPE),
        "--run-dir",
        str(run_dir),
        "--no-progress",
        *_sets(['reward_placement.mode="process"']),
    ]
    proc, builds = _launch(tmp, "run", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stderr, builds


def test_a_reward_process_gives_the_rewards_and_metrics_of_rank_placement(rank_run, tmp_path, capfd):
    """One process; the reward process scores on a background thread's requests, and
    the main process's evaluation goes through it too. The training process builds no
    rewarder; the reward process stops with the run."""
    run_dir = tmp_path / "run"
    built = _run_here(run_dir, ['reward_placement.mode="process"', "train.background_rewards=true"])
    assert built == []
    assert _rows(run_dir) == _rows(rank_run)
    assert len(_rows(run_dir)) == 3
    assert _evaluation(run_dir) == _evaluation(rank_run)
    err = capfd.readouterr().err
    pid = int(re.search(rf"{READY}127\.0\.0\.1:\d+ \(rewards: .*; pid (\d+)\)", err).group(1))
    gc.collect()
    with pytest.raises(ProcessLookupError):  # stopped (and reaped) when the run's objects went
        os.kill(pid, 0)


def test_two_processes_and_a_reward_process_match_one_process(rank_run, two_processes_local):
    run_dir, err, builds = two_processes_local
    assert not builds.exists()  # neither training process built a rewarder
    assert len(re.findall(f"{READY}127.0.0.1:", err)) == 1  # one reward process for both
    rows1, rows2 = _rows(rank_run), _rows(run_dir)
    assert len(rows1) == len(rows2) == 3
    for a, b in zip(rows1, rows2):
        assert a["reward_mean"] == b["reward_mean"] and a["reward_std"] == b["reward_std"]
        assert a["reward/shapes-quality_mean"] == b["reward/shapes-quality_mean"]
        assert a["adv_abs_mean"] == b["adv_abs_mean"]
    w1, w2 = _weights(rank_run), _weights(run_dir)
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-4, rtol=1e-3), k  # as tests/test_accelerate_fsdp.py


@pytest.fixture
def image_reward(tmp_path):
    """The shapes recipe plus a reward that reads images, registered in this process."""
    recipe = tmp_path / "images.toml"
    recipe.write_text(RECIPE.read_text() + IMAGE_REWARD)
    plugins.get_registry().register_plugin(ImagePlugin(), "placement-tests")
    yield recipe
    plugins.reset_registry()


def test_device_placement_builds_the_rewarders_on_the_main_process_only(image_reward, tmp_path):
    """Two processes, placement device: only rank 0 builds the rewarders; rewards,
    advantages and trained weights are those of one process in placement rank. The
    image reward makes the main process decode the first batch itself, then every
    process send its decoded images."""
    run_dir = tmp_path / "one"
    assert _run_here(run_dir, [], image_reward)[-1] == "test-image-corner"
    args = ["run", str(image_reward), "--run-dir", str(tmp_path / "two"), "--no-progress"]
    proc, builds = _launch(tmp_path, "device", [*args, *_sets(['reward_placement.mode="device"'])])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert builds.read_text().splitlines() == [
        "0 shapes-alignment cpu",
        "0 shapes-quality cpu",
        "0 shapes-clean cpu",
        "0 test-image-corner cpu",
    ]
    rows1, rows2 = _rows(run_dir), _rows(tmp_path / "two")
    assert len(rows1) == len(rows2) == 3
    for a, b in zip(rows1, rows2):
        assert a["reward_mean"] == b["reward_mean"] and a["reward_std"] == b["reward_std"]
        assert a["reward/test-image-corner_mean"] == b["reward/test-image-corner_mean"]
        assert a["adv_abs_mean"] == b["adv_abs_mean"]
    w1, w2 = _weights(run_dir), _weights(tmp_path / "two")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-4, rtol=1e-3), k  # as tests/test_accelerate_fsdp.py


def test_a_killed_reward_process_stops_every_process_and_the_run_resumes_exactly(
    two_processes_local, tmp_path
):
    """The reward process dies (SIGKILL) at the first request of iteration 2: both
    processes stop with one error line (exit non-zero, no hang), iteration 1 is
    checkpointed (the recipe checkpoints every 2), and with a reward process back on
    the same port ``--resume`` ends with the metrics and evaluation of the
    uninterrupted run."""
    port = _free_port()
    env = _env(tmp_path / "builds")
    script = tmp_path / "dies.py"
    script.write_text(SERVER_DIES_AT.format(n=3))
    dying = _start_server([str(script)], port, env)
    run_dir = tmp_path / "run"
    sets = _sets(['reward_placement.mode="process"', f'reward_placement.address="127.0.0.1:{port}"'])
    start = time.monotonic()
    try:
        proc, _ = _launch(
            tmp_path, "run", ["run", str(RECIPE), "--run-dir", str(run_dir), "--no-progress", *sets]
        )
        assert dying.poll() == -9  # it died at its 3rd request
    finally:
        if dying.poll() is None:
            dying.kill()
        dying.wait()
    assert proc.returncode != 0
    assert time.monotonic() - start < 240
    # one line per process that got to print it before the launcher stopped the other
    # (two processes' lines may interleave: "<line 1 text><line 2 text>\n\n")
    errors = ["mdmrl: error: " + part.split("\n")[0] for part in proc.stderr.split("mdmrl: error: ")[1:]]
    assert errors, proc.stderr[-3000:]
    for line in errors:
        assert re.fullmatch(
            rf"mdmrl: error: reward process at 127\.0\.0\.1:{port} died \([^)]+\); the run stopped in "
            rf"iteration 2 of 3 \(checkpoint iter_000001 kept\); resume with: mdmrl run --resume "
            + re.escape(str(run_dir)),
            line,
        ), line
    assert "RewardProcessError" not in proc.stderr  # a line, not a traceback
    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == ["iter_000001"]
    assert len(_rows(run_dir)) == 1

    server = _start_server(["-m", "mdmrl"], port, env)
    try:
        proc, _ = _launch(tmp_path, "resume", ["run", "--resume", str(run_dir), "--no-progress"])
    finally:
        server.terminate()
        server.wait()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stderr
    reference = two_processes_local[0]
    assert _rows(run_dir) == _rows(reference)
    assert _evaluation(run_dir) == _evaluation(reference)


# -- the protocol -------------------------------------------------------------------------------
@contextmanager
def serving(service: RewardService):
    server = RewardServer("127.0.0.1", 0, service)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _batch(n: int = 6) -> GeneratedBatch:
    tokens = torch.randint(0, 5, (n, 12), generator=torch.Generator().manual_seed(n))
    prompts = [f"red {i}" for i in range(n)]
    return GeneratedBatch(prompts, tokens, (3, 4), TinyBackbone().decode)


def _composite() -> CompositeRewarder:
    return CompositeRewarder(
        [("toy-count", 1.0, ToyReward(MeanOptions(target=1))), ("image", 0.5, ImageCorner())]
    )


def test_the_client_scores_exactly_and_sends_images_once_a_rewarder_reads_them():
    composite = _composite()
    service = RewardService(composite, "digest", torch.device("cpu"))
    with serving(service) as port:
        client = RemoteRewarder("127.0.0.1", port, 10.0, "digest", composite.labels)
        assert client.hello()["labels"] == ["toy-count", "image"]
        for n in (6, 3):
            got, want = client(_batch(n)), composite(_batch(n))
            assert torch.equal(got.total, want.total)
            assert got.components.keys() == want.components.keys()
            assert all(torch.equal(got.components[k], want.components[k]) for k in want.components)
        # the first request went without images and was answered "need images"
        assert client.needs_images and service.requests == 3


def test_a_reward_process_without_an_image_reward_never_receives_images():
    composite = CompositeRewarder([("toy-count", 1.0, ToyReward(MeanOptions(target=1)))])
    service = RewardService(composite, "d", torch.device("cpu"))
    batch = _batch()
    batch.decode_fn = None  # decoding would fail
    with serving(service) as port:
        client = RemoteRewarder("127.0.0.1", port, 10.0, "d", composite.labels)
        assert torch.equal(client(batch).total, composite(batch).total)
        assert not client.needs_images and service.requests == 1


def test_a_silent_reward_process_fails_the_call_within_the_timeout():
    with socket.socket() as listener:  # connections complete in the kernel's backlog; nothing answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        client = RemoteRewarder("127.0.0.1", port, 0.5, "d", ["toy-count"])
        start = time.monotonic()
        with pytest.raises(RewardProcessError) as err:
            client(_batch())
        assert time.monotonic() - start < 5
    assert str(err.value) == (
        f"reward process at 127.0.0.1:{port} did not answer within 0.5 s (reward_placement.timeout_s)"
    )
    assert err.value.exit_code == 4


def test_a_reward_process_that_is_gone_is_named_in_one_line():
    composite = _composite()
    with serving(RewardService(composite, "d", torch.device("cpu"))) as port:
        client = RemoteRewarder("127.0.0.1", port, 10.0, "d", composite.labels)
        client.hello()
    with pytest.raises(RewardProcessError) as err:
        client(_batch())
    assert str(err.value) == f"reward process at 127.0.0.1:{port} died (connection refused)"
    with pytest.raises(RewardProcessError) as err:
        RemoteRewarder("127.0.0.1", port, 10.0, "d", composite.labels).hello()
    assert str(err.value) == (
        f"reward process at 127.0.0.1:{port} is not reachable (connection refused); "
        f"start it with: mdmrl reward-server RECIPE --port {port}"
    )


def test_a_reward_process_of_other_rewards_is_refused():
    composite = _composite()
    with serving(RewardService(composite, "theirs", torch.device("cpu"))) as port:
        with pytest.raises(UserError, match="scores other rewards \\(toy-count, image\\) than this recipe's"):
            RemoteRewarder("127.0.0.1", port, 10.0, "ours", ["shapes-alignment"]).hello()


def test_a_failing_rewarder_and_a_garbage_frame_are_answered_not_fatal(capfd):
    class Broken(Rewarder):
        name = "broken"

        def score(self, batch):
            raise RuntimeError("boom")

    composite = CompositeRewarder([("broken", 1.0, Broken())])
    with serving(RewardService(composite, "d", torch.device("cpu"))) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
            assert sock.recv(100) == b""  # closed
        client = RemoteRewarder("127.0.0.1", port, 10.0, "d", ["broken"])
        with pytest.raises(
            RewardProcessError, match=f"^reward process at 127.0.0.1:{port}: RuntimeError: boom$"
        ):
            client(_batch())
        assert client.hello()["ok"]  # still serving
    assert "not an mdmrl reward-process frame; connection closed" in capfd.readouterr().err


# -- the recipe and the command -------------------------------------------------------------------
@pytest.mark.parametrize(
    "table, problem",
    [
        (
            'mode = "devices"',
            "reward_placement.mode: 'devices' is not allowed; choose one of: rank, device, process",
        ),
        (
            "timeout_s = 5",
            'reward_placement.timeout_s: has no effect in mode "rank" (read in mode "process" only); remove it',
        ),
        (
            'mode = "device"\naddress = "h:1"',
            'reward_placement.address: has no effect in mode "device" (read in mode "process" only); remove it',
        ),
        (
            'mode = "process"\naddress = "localhost"',
            "reward_placement.address: 'localhost' is not HOST:PORT with a port in 1..65535",
        ),
        (
            'mode = "process"\ndevice = "gpu"',
            "reward_placement.device: 'gpu' is not allowed; use auto, cpu, cuda or cuda:N",
        ),
        ('mode = "process"\ntimeout_s = 0', "reward_placement.timeout_s: 0.0 must be greater than 0.0"),
    ],
)
def test_bad_placements_are_one_line_each(tmp_path, capsys, table, problem):
    path = tmp_path / "r.toml"
    path.write_text(RECIPE.read_text() + f"\n[reward_placement]\n{table}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mdmrl: error: {path}: 1 problem(s): {problem}") and err.count("\n") == 1, err


def test_the_placement_is_in_the_schema():
    from mdmrl.docgen import recipe_schema

    schema = json.dumps(recipe_schema())
    assert '"enum": ["rank", "device", "process"]' in schema and "timeout_s" in schema


def test_the_reward_server_command_refuses_bad_input_in_one_line(tmp_path, capsys):
    assert main(["reward-server", str(RECIPE), "--port", "70000"]) == 2
    assert (
        capsys.readouterr().err
        == "mdmrl: error: --port: 70000 is not allowed; use 1..65535, or 0 for any free port\n"
    )
    assert main(["reward-server", str(tmp_path / "missing.toml")]) == 2
    assert capsys.readouterr().err == f"mdmrl: error: {tmp_path / 'missing.toml'}: recipe file not found\n"


def test_a_run_on_several_machines_needs_an_address(toy_registry, toy_recipe, monkeypatch):
    from types import SimpleNamespace

    from mdmrl import recipe as rc

    loaded = rc.load(toy_recipe, ['reward_placement.mode="process"'])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError, match="this run spans several machines"):
        connect(loaded, SimpleNamespace(world_size=4, is_main=True, active=True))


@pytest.mark.parametrize(
    "mine, others, raised",
    [
        (None, [0, 0], None),
        (None, [1, 0], "RewardProcessError: the reward process failed for another process of this run"),
        (None, [0, 1], "ScoringError: scoring failed in another process of this run"),
        ("lost", [1, 0], "RewardProcessError: reward process at h:1 died (connection refused)"),
        ("lost", [0, 1], "ScoringError: reward process at h:1 died (connection refused)"),
        ("broken", [1, 0], "KeyError: 'x'"),
    ],
)
def test_processes_agree_on_how_to_stop(mine, others, raised):
    """Every process stops when scoring failed on any; they checkpoint (a
    RewardProcessError everywhere) only when every failure was the reward process's."""
    from types import SimpleNamespace

    from mdmrl.rewarding import stop_together

    failure = {
        "lost": RewardProcessError("reward process at h:1 died (connection refused)"),
        "broken": KeyError("x"),
    }
    reduce = lambda t, op: t + torch.tensor(others)  # noqa: E731 - the other process's counts
    dist = SimpleNamespace(active=True, accelerator=SimpleNamespace(device="cpu", reduce=reduce))
    if raised is None:
        stop_together(dist, failure.get(mine))
        return
    with pytest.raises(Exception) as err:
        stop_together(dist, failure.get(mine))
    assert f"{type(err.value).__name__}: {err.value}".startswith(raised)
