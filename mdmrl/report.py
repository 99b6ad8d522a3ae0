"""``mdmrl report RUN_DIR``: PNG plots of a run from its logs.

plots/rewards.png — total reward (mean ± std over the batch) and each component per
iteration, phases shaded. plots/schedule.png — the schedule actions (r, tau_s,
tau_r, s) against the step t: the policy's mean action before training (for a
learned policy initialised to a fixed schedule, that fixed schedule) beside the
mean action after training, from the evaluation records.
"""

from __future__ import annotations

import json
from pathlib import Path

from mdmrl.errors import UserError
from mdmrl.trajectory import ACTION_FIELDS

LABELS = {
    "temperature": "sampling temperature τ_s",
    "remask_ratio": "re-mask ratio r",
    "remask_temperature": "re-mask temperature τ_r",
    "cfg_scale": "CFG scale s",
}


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no metrics.jsonl)")
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def report(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = _rows(run_dir)
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = []
    if rows:
        it = [r["iteration"] for r in rows]
        fig, ax = plt.subplots(figsize=(7, 4))
        mean = [r["reward_mean"] for r in rows]
        std = [r["reward_std"] for r in rows]
        ax.plot(it, mean, label="total", color="black")
        ax.fill_between(
            it,
            [m - s for m, s in zip(mean, std)],
            [m + s for m, s in zip(mean, std)],
            alpha=0.15,
            color="black",
        )
        for key in sorted({k for r in rows for k in r if k.startswith("reward/") and k.endswith("_mean")}):
            ax.plot(it, [r.get(key, float("nan")) for r in rows], label=key[7:-5], alpha=0.8)
        for r in rows:
            if r.get("phase") == "schedule":
                ax.axvspan(r["iteration"] - 0.5, r["iteration"] + 0.5, color="tab:orange", alpha=0.08, lw=0)
        ax.set_xlabel("iteration (orange: schedule phase)")
        ax.set_ylabel("training reward")
        ax.legend(fontsize=8)
        ax.set_title(run_dir.name)
        fig.tight_layout()
        fig.savefig(out / "rewards.png", dpi=110)
        plt.close(fig)
        written.append(out / "rewards.png")
    evals = {}
    for label in ("base", "trained"):
        found = sorted((run_dir / "eval").glob(f"{label}@*.json"))
        if found:
            evals[label] = json.loads(found[-1].read_text())
    if evals:
        fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
        for ax, name in zip(axes, ACTION_FIELDS):
            for label, style in (("base", "--"), ("trained", "-")):
                if label in evals and "actions" in evals[label]:
                    ys = evals[label]["actions"][name]
                    ax.plot(
                        range(len(ys)),
                        ys,
                        style,
                        marker=".",
                        label="fixed/initial" if label == "base" else "learned",
                    )
            ax.set_title(LABELS[name], fontsize=9)
            ax.set_xlabel("step t")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "schedule.png", dpi=110)
        plt.close(fig)
        written.append(out / "schedule.png")
    return written
