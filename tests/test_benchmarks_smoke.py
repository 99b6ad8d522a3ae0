"""Each benchmark script runs end to end at its smallest sizes (``--quick``) and writes
a JSON record with the expected keys. Speed is not asserted: these are smoke tests."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
#: Small and stable on a shared machine: one thread, no warm-up call, one repeat.
QUICK = ["--quick", "--threads", "1", "--warmup", "0"]


def _load(name: str):
    """Import benchmarks/<name>.py (its folder goes on sys.path, as when run as a script)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    key = f"mdmrl_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def _run(name: str, tmp_path: Path, *extra: str) -> dict:
    main = _load(name).main
    import common

    out = tmp_path / f"{name}.json"
    threads = torch.get_num_threads()
    record = common.run_main(main, [*QUICK, "--json", str(out), *extra])
    assert torch.get_num_threads() == threads  # the script's --threads does not leak
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(record, default=str))
    assert set(data) == {"environment", "quick", "results", "targets"}
    assert data["quick"] is True
    env = data["environment"]
    for key in ("device_label", "torch", "torch_threads", "load_average_start", "load_average_end"):
        assert key in env, key
    for t in data["targets"].values():
        assert set(t) == {"value", "target", "met"}
        assert t["met"] == (
            t["value"] <= float(t["target"].split()[1])
            if t["target"].startswith("<=")
            else t["value"] >= float(t["target"].split()[1])
        )
    return data


def test_sampler_overhead_quick(tmp_path, capsys):
    data = _run("sampler_overhead", tmp_path, "--profile", "always")
    cases = data["results"]["cases"]
    assert {(c["model"], c["rng"]) for c in cases} == {
        (m, r) for m in ("shapes-mdm", "amused-tiny") for r in ("per_sample", "shared")
    }
    for c in cases:
        assert c["forward_calls"] == c["steps"] and c["forward_batch"] == 2 * c["batch"]
        assert c["ratio"] == pytest.approx(c["rollout"]["median_s"] / c["floor"]["median_s"])
    profiles = data["results"]["profiles"]
    assert len(profiles) == 4
    for p in profiles.values():
        # the marked forward region is seen once per step
        assert p["forward_calls"] == cases[0]["steps"]
        assert p["top_ops"] and p["forward_s"] > 0
    assert "overhead" in capsys.readouterr().out


def test_amused_peer_quick(tmp_path, capsys):
    data = _run("amused_peer", tmp_path)
    r = data["results"]
    # the parity configuration reproduces the pipeline's tokens and images exactly
    assert r["tokens_equal"] is True and r["image_max_abs_diff"] == 0.0
    assert set(r["timings"]) == {"ours_tokens", "peer_tokens", "ours_images", "peer_images"}
    assert r["speedup_tokens"] == pytest.approx(
        r["images_per_s"]["ours_tokens"] / r["images_per_s"]["peer_tokens"]
    )
    assert "tokens equal = True" in capsys.readouterr().out


def test_training_quick(tmp_path):
    data = _run("training", tmp_path, "--reward-kinds", "sleep")
    r = data["results"]
    assert {c["model"] for c in r["replay"]} == {"shapes-mdm", "amused-tiny"}
    for c in r["replay"]:
        assert set(c) >= {
            "replay",
            "plain_fwd_bwd_2B",
            "plain_fwd_bwd_B",
            "ratio_vs_plain_2B",
            "ratio_vs_plain_B",
        }
    rows = r["timestep_fraction"]["rows"]
    assert [row["fraction"] for row in rows] == [1.0, 0.5, 0.25]
    assert [row["terms"] for row in rows] == [4, 2, 1]
    bg = r["background_rewards"]
    assert bg["chunks"] == 4 and set(bg["kinds"]) == {"sleep"}
    k = bg["kinds"]["sleep"]
    assert k["sum_s"] == pytest.approx(k["rollout_s"] + k["reward_s"])
    assert k["reward_s"] == pytest.approx(bg["calibration_rollout_s"])  # W = 1 x R by default
    assert k["sequential"]["median_s"] >= k["reward_s"]  # the padded reward really costs its time


def test_scaling_quick(tmp_path):
    figs = tmp_path / "figs"
    data = _run("scaling", tmp_path, "--figures", str(figs))
    r = data["results"]
    assert set(r) == {"architecture", "tokens", "steps", "batch"}
    assert [p["tokens"] for p in r["tokens"]["points"]] == [16, 64]
    assert [p["steps"] for p in r["steps"]["points"]] == [2, 4]
    assert [p["batch"] for p in r["batch"]["points"]] == [2, 4]
    for sweep in (r["tokens"], r["steps"], r["batch"]):
        assert set(sweep["slopes"]) == {"rollout", "train"}
        png = Path(sweep["figure"])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_guidance_quick(tmp_path):
    data = _run("guidance", tmp_path)
    (point,) = data["results"]["points"]
    assert point["steps"] == 4 and data["results"]["batch"] == 4
    for kind in ("guided", "guidance-free"):
        assert point[kind]["images_per_s"] > 0
        assert point[kind]["rollout"]["repeats"] == 1
    assert point["rollout_ratio"] == pytest.approx(
        point["guided"]["rollout"]["median_s"] / point["guidance-free"]["rollout"]["median_s"]
    )
    assert list(data["targets"]) == ["T=4: guided / guidance-free rollout time (half the forward rows)"]


def test_allocator_quick(tmp_path, capsys):
    data = _run("allocator", tmp_path, "--models", "shapes-mdm")
    r = data["results"]["shapes-mdm"]
    # each setting ran in its own child process, and the children applied it or not
    assert {rec["malloc"] for rec in r["runs"]["kept"]} == {"set"}
    assert {rec["malloc"] for rec in r["runs"]["default"]} == {"disabled"}
    for key in ("rollout_s", "floor_s"):
        assert r["speedup"][key] == pytest.approx(r["median"]["default"][key] / r["median"]["kept"][key])
    assert "default / kept" in capsys.readouterr().out


def test_sampler_revisions_quick(tmp_path, capsys):
    data = _run(
        "sampler_revisions", tmp_path, "--revs", "HEAD", "--models", "shapes-mdm", "--rng", "per_sample"
    )
    assert data["results"]["revisions"]["work"] == "work"
    assert data["results"]["revisions"]["HEAD"]  # the short commit of HEAD
    (case,) = data["results"]["cases"]
    assert set(case["versions"]) == {"work", "HEAD"}
    work = case["versions"]["work"]
    assert work["same_as_first"] is True
    for v in case["versions"].values():
        assert 0 < v["inside_forward_median_s"] < v["rollout"]["median_s"]
        assert v["ratio_in_run"] > 1
    assert data["targets"] == {}
    assert "outside fwd ms" in capsys.readouterr().out


def test_sampler_revisions_names_an_unknown_revision(tmp_path):
    with pytest.raises(SystemExit) as exc:
        _run("sampler_revisions", tmp_path, "--revs", "no-such-revision", "--models", "shapes-mdm")
    assert "cannot read plugins/cogrpo/sampler.py at 'no-such-revision'" in str(exc.value)


def test_iteration_cost_quick(tmp_path, capsys):
    data = _run("iteration_cost", tmp_path, "--configs", "ablation,fast")
    res = data["results"]
    assert set(res) == {"ablation", "fast"}
    for r in res.values():
        assert r["ms_per_sample"] > 0
        for phase in ("model", "schedule"):
            split = r["phases"][phase]["split_s"]
            assert sum(split.values()) <= r["phases"][phase]["wall_s"] + 1e-6
            assert split["time_rollout"] > 0 and split["time_replay_backward"] > 0
    assert res["ablation"]["phases"]["model"]["split_s"]["time_kl"] == 0.0  # no monitor in that recipe
    assert res["fast"]["phases"]["model"]["split_s"]["time_kl"] > 0.0
    assert data["targets"]["per-sample speed-up"]["value"] == res["fast"]["speedup_vs_ablation"]
    assert "× vs ablation" in capsys.readouterr().out


def test_memory_plan_quick(tmp_path, capsys):
    data = _run("memory_plan", tmp_path)
    r = data["results"]
    small = {"meissonic-small", "llada-small", "shapes-mdm"}
    assert set(r["models"]) == small
    for name in ("meissonic-small", "llada-small"):
        cells = r["models"][name]["plan"]
        # every variant (full / LoRA x with / without checkpointing) under every engine and GPU count
        assert len(cells) == 4 * 3 * 3
        for cell in cells:
            t = cell["terms"]
            assert t["peak"] == max(t["training_step"], t["persistent"] + t["rollout"])
    for name in ("meissonic-small", "llada-small"):
        c = r["models"][name]["counts"]
        for acts in (c["train"], c["train_lora"]):  # checkpointing saves activations
            assert 0 < acts["checkpointing"]["lines"][-1][1] < acts["plain"]["lines"][-1][1]
    checks = r["checks"]
    assert {c["model"] for c in checks} == small
    steps = {
        (c["model"], c["lora"], c["checkpointing"]): c["measured"]
        for c in checks
        if c["phase"] == "update" and c["precision"] == "fp32"
    }
    for (model, lora, ckpt), measured in steps.items():  # ... and a real step sees it
        if ckpt:
            assert measured < steps[(model, lora, False)]
    assert {c["phase"] for c in checks} == {"update", "rollout"}
    for c in checks:
        assert c["ratio"] == c["predicted"] / c["measured"]
    assert data["targets"]["lowest formula / measured"]["met"]
    assert data["targets"]["highest formula / measured"]["met"]
    assert "formula / measured" in capsys.readouterr().out
