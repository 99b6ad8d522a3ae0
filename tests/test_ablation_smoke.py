"""The benchmark scripts run end to end (``--smoke``: a tiny random-weight backbone) and
print tables of the documented structure; a rerun resumes from the cache. The numbers
themselves are not asserted: a random backbone has nothing to measure."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CELL = re.compile(r"^-?\d+\.\d+ ± \d+\.\d+$")


def _load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sections(text: str) -> dict[str, str]:
    """'### title' -> body."""
    out = {}
    for block in text.split("\n### ")[1:]:
        title, _, body = block.partition("\n")
        out[title] = body
    return out


def tables(body: str) -> list[list[list[str]]]:
    """Every markdown table of a section: rows of cells, header first, rule dropped."""
    found, cur = [], []
    for line in body.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                cur.append(cells)
        elif cur:
            found.append(cur)
            cur = []
    return found


def section(secs: dict[str, str], prefix: str) -> str:
    hits = [body for title, body in secs.items() if title.startswith(prefix)]
    assert len(hits) == 1, (prefix, list(secs))
    return hits[0]


def run_smoke(mod, folder: Path, seeds: int, json_name: str, capsys) -> tuple[list[str], str, dict[str, str]]:
    """Run a results script's ``main`` with ``--smoke``, its cache and JSON file under
    ``folder``, and check that it succeeds: (its arguments, its stdout, the sections)."""
    args = ["--smoke", "--seeds", str(seeds), "--out", str(folder / "cache")]
    args += ["--json", str(folder / json_name)]  # last: a test may swap the JSON path
    assert mod.main(args) == 0
    out = capsys.readouterr().out
    return args, out, sections(out)


def without_header(out: str) -> str:
    """A results script's stdout without its title and command line (date, wall time)."""
    return out.split("\n", 3)[3]


@pytest.fixture(scope="module")
def ablate_run(tmp_path_factory):
    mod = _load("ablate")
    tmp = tmp_path_factory.mktemp("ablate")
    return mod, tmp


def test_ablate_smoke_tables_and_resume(ablate_run, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mod, tmp = ablate_run
    smoke = mod.pick_budget("quick", mod.BUDGETS, smoke=True)  # the budget main() runs with --smoke
    args, out, secs = run_smoke(mod, tmp, 2, "a.json", capsys)

    t2 = tables(section(secs, "Table 2 analogue"))[0]
    assert t2[0] == ["steps", "γ = 1.0", "γ = 1.5", "γ = 2.0"]
    assert [int(r[0]) for r in t2[1:]] == list(smoke.table2_steps)
    assert all(CELL.match(c) for r in t2[1:] for c in r[1:])

    t5a = tables(section(secs, "Table 5a analogue"))[0]
    assert t5a[0] == ["row", "model", "r", "τ_r", "τ_s", "s", "total", "alignment", "quality"]
    assert [r[0] for r in t5a[1:]] == [
        "none (base)",
        "Naive GRPO",
        "+r",
        "+τ_r",
        "+τ_s (Co-GRPO recipe)",
        "+s",
    ]
    ticks = [sum(c == "✓" for c in r[1:6]) for r in t5a[1:]]
    assert ticks == [0, 1, 2, 3, 4, 5]  # one more trainable component per row
    assert all(CELL.match(c) for r in t5a[1:] for c in r[6:])

    t5b = tables(section(secs, "Table 5b analogue"))[0]
    assert t5b[0] == ["test steps", "train steps", "fixed", "learned", "Δ"]
    assert [int(r[0]) for r in t5b[1:]] == list(smoke.transfer_steps)
    assert {r[1] for r in t5b[1:]} == {str(smoke.train_steps)}

    dirs = tables(section(secs, "Directions of the paper"))[0]
    assert dirs[0] == ["direction (a above b)", "a", "b", "a − b", "verdict (2 SE)"]
    claims = [r[0] for r in dirs[1:]]
    for prefix in (
        "Table 2, T = 2",
        "5a: +s above +τ_s",
        "5b: learned above fixed at T = 4",
        "5c:",
        "5d:",
        "target (i)",
    ):
        assert any(c.startswith(prefix) for c in claims), prefix
    assert {r[4] for r in dirs[1:]} <= {"**reproduced**", "**reversed**", "not separated"}
    for r in dirs[1:]:  # the difference is a minus b
        (a, _), (b, _), (d, _) = (map(float, r[i].split(" ± ")) for i in (1, 2, 3))
        assert d == pytest.approx(a - b, abs=2e-3)

    t5c = tables(section(secs, "Table 5c analogue"))[0]
    assert [int(r[0]) for r in t5c[1:]] == list(range(smoke.cycles + 1))
    per = smoke.model_iterations + smoke.schedule_iterations
    assert [int(r[1]) for r in t5c[1:]] == [per * c for c in range(smoke.cycles + 1)]

    t5d = tables(section(secs, "Table 5d analogue"))[0]
    assert [r[0] for r in t5d[1:]] == ["base", "joint", "alternating"]
    assert [r[1] for r in t5d[2:]] == [str(smoke.iterations)] * 2

    targets = section(secs, "Performance targets")
    assert re.search(r"\(i\) learned schedule .* -> \*\*(met|not met)\*\*", targets)
    curve = tables(targets)[0]
    assert curve[0] == ["iteration", "Naive GRPO", "Co-GRPO"]
    assert int(curve[-1][0]) == smoke.iterations
    after_curve = targets.rsplit("|", 1)[1]
    assert re.search(r"-> \*\*(met|not met|not measurable)\*\*", after_curve)

    data = json.loads((tmp / "a.json").read_text())
    assert data["raw"]["seeds"] == [0, 1]
    assert set(data["tables"]) >= {
        "table2",
        "table5a",
        "table5b",
        "table5c",
        "table5d",
        "target_i",
        "target_ii",
    }
    assert len(data["raw"]["runs"]["co-grpo"]) == 2
    # the row with the shipped recipe's components is the recipe's own run, not a second copy
    assert "+τ_s" not in data["raw"]["runs"] and len(data["raw"]["runs"]["+s"]) == 2

    # a rerun trains nothing (every run comes from the cache) and prints the same tables
    assert mod.main(args) == 0
    again = capsys.readouterr()
    assert "iterations in" not in again.err
    assert "cached" in again.err
    assert without_header(again.out) == without_header(out)

    # --partial computes nothing: from the full cache it prints the same tables, from an
    # empty one it marks the output partial and leaves every measured cell empty
    assert mod.main(args + ["--partial"]) == 0
    assert without_header(capsys.readouterr().out) == without_header(out)
    empty = ["--smoke", "--seeds", "2", "--out", str(tmp / "empty"), "--partial"]
    assert mod.main(empty) == 0
    part = capsys.readouterr().out
    assert "**PARTIAL**: 0 of" in part
    assert "iterations in" not in part
    t5a = tables(section(sections(part), "Table 5a analogue"))[0]
    assert all(r[6] == "—" for r in t5a[1:])


def test_compare_smoke_tables(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mod = _load("compare_methods")
    args, out, secs = run_smoke(mod, tmp_path, 2, "c.json", capsys)

    methods = tables(section(secs, "Methods at an equal budget"))[0]
    assert methods[0] == [
        "method",
        "sampler",
        "iterations",
        "untrained",
        "held-out",
        "alignment",
        "quality",
        "gain / min",
    ]
    assert [(r[0], r[1]) for r in methods[1:]] == [
        ("Naive GRPO", "confidence"),
        ("MaskGRPO", "confidence"),
        ("MaskGRPO", "emerge"),
        ("Co-GRPO", "confidence"),
    ]
    assert all(CELL.match(c) for r in methods[1:] for c in r[2:])

    gam = tables(section(secs, "MaskGRPO truncation"))[0]
    assert gam[0] == ["γ", "iterations", "held-out"]
    assert [float(r[0]) for r in gam[1:]] == [0.0, 0.6, 0.8, 0.9]

    dirs = tables(section(secs, "Directions, measured"))[0]
    pairs = [r for r in dirs[1:] if r[0].startswith("pair: ")]
    assert len(pairs) == 6  # every pair of the four methods once
    for r in pairs:  # written the way it was measured: a's mean is not below b's
        a, b = (float(r[i].split(" ± ")[0]) for i in (1, 2))
        assert a >= b
    assert sum(r[0].startswith("paper: ") for r in dirs[1:]) == 6

    data = json.loads((tmp_path / "c.json").read_text())
    runs = data["raw"]["runs"]
    assert all(len(v) == 2 for v in runs.values())
    # every run trained at least one iteration and stopped on its wall-clock budget
    assert all(r["iterations"] >= 1 for v in runs.values() for r in v)
    # gamma = 0.8 is the recipe's default: the same run as "MaskGRPO (emerge)", from the cache
    assert runs["MaskGRPO γ=0.8"] == runs["MaskGRPO (emerge)"]

    # --reverse trains the last seed first; from the same cache it lists the runs by seed
    # as before, so a second invocation beside a running one shares its work
    rev = tmp_path / "rev.json"
    capsys.readouterr()
    assert mod.main(args[:-1] + [str(rev), "--reverse"]) == 0
    assert json.loads(rev.read_text())["raw"]["runs"] == runs
    log = capsys.readouterr().err
    assert log.index("Naive GRPO (confidence) seed 1: cached") < log.index(
        "Naive GRPO (confidence) seed 0: cached"
    )
    # rows too run last to first within a seed
    assert log.index(f"{list(runs)[-1]} seed 1: cached") < log.index("Naive GRPO (confidence) seed 1: cached")


@pytest.mark.parametrize("recipe", ["co_grpo", "co_grpo_joint", "mask_grpo", "naive_grpo", "fixed_schedule"])
def test_a_budgets_guidance_reaches_every_recipes_schedule(recipe, tmp_path):
    _load("ablate")  # puts benchmarks/ on the path
    from _runs import SMOKE, Runner, replace

    from mdmrl.build import build_parts
    from mdmrl_plugins.cogrpo.schedules import fixed_actions

    runner = Runner(replace(SMOKE, guidance=1.0, eval_count=7), tmp_path)
    loaded = runner.load(recipe, [])
    assert loaded.recipe.prompts.eval.options["count"] == 7
    schedule = build_parts(loaded).schedule
    policy = getattr(schedule, "base", schedule)  # the Gaussian policy's mean is its base schedule
    # every step's action carries s = 1 (the recipes ship 1 or 3)
    assert bool((fixed_actions(policy, 4)[:, -1] == 1.0).all())


def test_verdicts_need_two_standard_errors_of_the_difference():
    _load("ablate")
    from _runs import difference, mean_se, verdict

    assert mean_se([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0 / 3**0.5))
    assert difference((1.0, 0.3), (0.5, 0.4)) == pytest.approx((0.5, 0.5))
    # 0.5 apart with an error of 0.5 on the difference: one standard error, not a finding
    assert verdict((1.0, 0.3), (0.5, 0.4)) == "not separated"
    assert verdict((1.0, 0.1), (0.5, 0.1)) == "**reproduced**"  # 0.5 > 2 x 0.141
    assert verdict((0.5, 0.1), (1.0, 0.1)) == "**reversed**"
    assert verdict((float("nan"), 0.0), (1.0, 0.1)) == "not available"
    # one seed has no error: its difference from anything is not a finding
    one = mean_se([0.9])
    assert one[0] == 0.9 and verdict(one, (0.1, 0.01)) == "no error estimate"
