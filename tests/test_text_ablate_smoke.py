"""benchmarks/text_ablate.py runs end to end on the embedded text world (``--smoke``: 4
completions per iteration, one step per block, 6 held-out problems, a few iterations
per row) and prints every row of its tables; with one training seed no direction is
called. It refuses to compare recipes that differ beyond the method. The numbers
themselves are not asserted: a few iterations have nothing to measure."""

from __future__ import annotations

import json
import re
from pathlib import Path

from test_ablation_smoke import _load, run_smoke, section, tables, without_header

ROOT = Path(__file__).resolve().parents[1]
ONE_SEED = re.compile(r"^-?\d+\.\d+ \(one seed\)$")


def test_text_ablate_smoke_tables(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mod = _load("text_ablate")
    args, out, secs = run_smoke(mod, tmp_path, 1, "t.json", capsys)

    ablation = tables(section(secs, "MaskGRPO's text ablation"))[0]
    assert ablation[0] == [
        "row",
        "re-mask",
        "γ",
        "paper, GSM8K-256",
        "iterations",
        "accuracy",
        "Δ accuracy",
        "format",
        "total",
    ]
    assert [tuple(r[:3]) for r in ablation[1:]] == [
        ("base model (no RL)", "", ""),
        ("Naive GRPO", "—", "—"),
        ("MaskGRPO", "random", "0.6"),
        ("MaskGRPO", "AR-fading", "0"),
        ("MaskGRPO", "AR-fading", "0.6"),
        ("MaskGRPO", "AR-fading", "0.8"),
    ]
    # the base model's spread is over its sampling seeds; a trained row has one seed
    assert all(re.match(r"^\d+\.\d ± \d+\.\d$", c) for c in (ablation[1][5], ablation[1][7], ablation[1][8]))
    assert all(ONE_SEED.match(c) for r in ablation[2:] for c in r[4:])

    methods = tables(section(secs, "Methods at an equal budget"))[0]
    assert [r[0] for r in methods[1:]] == ["base model (no RL)", "Naive GRPO", "MaskGRPO", "Co-GRPO"]
    assert methods[4][2] == "learned (τ_s, r)"
    assert all(ONE_SEED.match(c) for r in methods[2:] for c in r[3:])

    dirs = tables(section(secs, "Directions, measured"))[0]
    assert dirs[0] == ["direction (a above b)", "a", "b", "a − b", "verdict (2 SE)"]
    claims = [r[0] for r in dirs[1:]]
    for prefix in (
        "paper: MaskGRPO random re-mask (γ 0.6) above Naive GRPO",
        "paper: AR-fading above random re-mask",
        "paper: γ 0.6 above γ 0,",
        "paper: γ 0.6 above γ 0.8",
        "paper: MaskGRPO (AR-fading, γ 0.6) above Naive GRPO",
        "Co-GRPO paper (images): Co-GRPO above Naive GRPO",
        "pair: ",
        "RL helps: Naive GRPO",
        "RL helps: MaskGRPO",
        "RL helps: Co-GRPO",
    ):
        assert sum(c.startswith(prefix) for c in claims) == 1, prefix
    # one training seed has no standard error: no direction is called
    assert {r[4] for r in dirs[1:]} == {"no error estimate"}
    assert "- No error estimate (one training seed): paper: MaskGRPO random re-mask" in out
    assert "Reproduced" not in out

    data = json.loads((tmp_path / "t.json").read_text())
    runs = data["raw"]["runs"]
    assert sorted(runs) == sorted(["naive", "random-0.6", "ar-0", "ar-0.6", "ar-0.8", "co-grpo"])
    assert all(len(v) == 1 and v[0]["iterations"] >= 1 for v in runs.values())
    # every run stopped on its CPU-time budget, not on the recipe's plan
    budget = data["raw"]["minutes"] * 60
    assert all(r["train_seconds"] >= budget for v in runs.values() for r in v)
    # the smoke plan reaches Co-GRPO's schedule phase
    assert {row["phase"] for row in runs["co-grpo"][0]["curve"]} == {"model", "schedule"}
    # each row is the recipe it names with its objective's options (through the same
    # loader and overrides as the runs)
    from _runs import Runner

    runner = Runner(
        mod.budget_for(mod.validate([])["mask_grpo"], 0.005, True),
        tmp_path / "load",
        recipes=mod.TEXT_RECIPES,
    )
    seen = {}
    for key, _, recipe, ov in mod.ROWS:
        r = runner.load(recipe, ov + mod.smoke_overrides()).recipe
        seen[key] = (
            r.objective.name,
            r.objective.options.get("remask"),
            r.objective.options.get("gamma"),
            r.schedule.name,
        )
    assert seen == {
        "naive": ("grpo", None, None, "llada"),
        "random-0.6": ("mask-grpo", "random", 0.6, "llada"),
        "ar-0": ("mask-grpo", "ar-fading", 0.0, "llada"),
        "ar-0.6": ("mask-grpo", "ar-fading", 0.6, "llada"),
        "ar-0.8": ("mask-grpo", "ar-fading", 0.8, "llada"),
        "co-grpo": ("grpo", None, None, "gaussian"),
    }

    # --partial computes nothing and prints the same tables from the cache
    assert mod.main(args + ["--partial"]) == 0
    again = capsys.readouterr()
    assert "iterations in" not in again.err and "PARTIAL" not in again.out
    assert without_header(again.out) == without_header(out)


def test_recipes_that_differ_beyond_the_method_are_refused(tmp_path, capsys, monkeypatch):
    mod = _load("text_ablate")
    folder = tmp_path / "recipes" / "text"
    folder.mkdir(parents=True)
    weights = (ROOT / "plugins" / "text" / "weights" / "arith-llada").as_posix()
    for name in ("mask_grpo", "naive_grpo", "co_grpo"):
        text = (ROOT / "recipes" / "text" / f"{name}.toml").read_text()
        text = text.replace('path = "../../plugins/text/weights/arith-llada"', f'path = "{weights}"')
        if name == "naive_grpo":
            text = text.replace("steps = 20\n", "steps = 10\n", 1)
        (folder / f"{name}.toml").write_text(text)
    monkeypatch.setattr(mod, "TEXT_RECIPES", folder)
    assert mod.main(["--smoke", "--seeds", "1", "--out", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "text_ablate.py: error: recipes/text/naive_grpo.toml: [sampler] differs from recipes/text/mask_grpo.toml's; "
        "the rows would not compare one method at a time (make them equal)"
    ]
    assert not (tmp_path / "cache").exists()  # nothing ran


def test_a_bad_override_is_one_line(tmp_path, capsys):
    mod = _load("text_ablate")
    assert mod.main(["--smoke", "--out", str(tmp_path / "c"), "--set", "objective.options.gama=0.3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "objective.options.gama: unknown key" in err[0]


def test_directions_summary_groups_claims_by_verdict():
    _load("text_ablate")
    from _runs import directions_summary

    nan = float("nan")
    claims = [
        ("a above b", (1.0, 0.1), (0.5, 0.1)),  # 0.5 > 2 x 0.141
        ("c above d", (0.5, 0.1), (1.0, 0.1)),
        ("e above f", (1.0, 0.3), (0.5, 0.4)),  # one standard error apart
        ("g above h", (1.0, 0.2), (0.9, 0.2)),
        ("i above j", (1.0, nan), (0.5, 0.1)),  # one training seed
    ]
    assert directions_summary(claims).splitlines() == [
        "- Reproduced (a above b beyond two standard errors): a above b.",
        "- Reversed (b above a beyond two standard errors): c above d.",
        "- Not separated (within two standard errors): e above f; g above h.",
        "- No error estimate (one training seed): i above j.",
    ]


def test_reverse_trains_the_runs_last_to_first_and_lists_seeds_in_order(tmp_path):
    """Two processes sharing a sweep (one with --reverse) meet in its middle: the reverse
    order is the forward order backwards, rows included, so the two never train the
    same seed's rows side by side."""
    mod = _load("text_ablate")

    class Recorder:
        def __init__(self):
            self.order = []

        def evaluate_untrained(self, *args):
            return None

        def train(self, spec):
            self.order.append((spec.seed, spec.label))
            return {"seed": spec.seed, "label": spec.label}

    budget = mod.budget_for(mod.validate([])["mask_grpo"], 0.005, True)
    labels = [label for _, label, _, _ in mod.ROWS]
    forward = [(s, label) for s in (0, 1, 2) for label in labels]  # seed-major
    for reverse, expected in ((False, forward), (True, forward[::-1])):
        rec = Recorder()
        raw = mod.run_all(rec, budget, [0, 1, 2], 0.005, [], reverse=reverse)
        assert rec.order == expected
        assert all([r["seed"] for r in runs] == [0, 1, 2] for runs in raw["runs"].values())
