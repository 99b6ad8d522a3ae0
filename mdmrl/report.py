"""``mdmrl report RUN_DIR``: PNG plots of a run from its logs.

plots/rewards.png — total reward (mean ± std over the batch) and each component per
iteration, phases shaded. plots/kl.png — the KL from the initial model on the rollout
tokens per iteration. plots/timing.png — an iteration's wall time split into rollout,
reward, KL measurement, objective preparation, log-prob replay with backward, and
optimizer step. plots/schedule.png — the schedule actions (r, tau_s,
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


#: The parts of an iteration's wall time, stacked in plots/timing.png.
TIMINGS = ("time_rollout", "time_reward", "time_kl", "time_prepare", "time_replay_backward", "time_optimizer")


def _series_plot(plt, rows: list[dict], path: Path, keys: dict, ylabel: str, stacked: bool = False) -> list:
    """One line (or stacked area) per metric in ``keys`` present in the rows; [] if none is."""
    present = [k for k in keys if any(k in r for r in rows)]
    if not present:
        return []
    it = [r["iteration"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    series = [[r.get(k, float("nan")) for r in rows] for k in present]
    if stacked:
        ax.stackplot(
            it, [[0.0 if v != v else v for v in s] for s in series], labels=[keys[k] for k in present]
        )
    else:
        for k, ys in zip(present, series):
            ax.plot(it, ys, label=keys[k])
    for r in rows:
        if r.get("phase") == "schedule":
            ax.axvspan(r["iteration"] - 0.5, r["iteration"] + 0.5, color="tab:orange", alpha=0.08, lw=0)
    ax.set_xlabel("iteration (orange: schedule phase)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


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
        written += _series_plot(
            plt,
            rows,
            out / "kl.png",
            {
                "kl_ref_k3": "k3 per step (the kl_beta penalty's estimator)",
                "kl_ref_seq": "whole trajectory (k1)",
            },
            "KL(current || initial model) on rollout tokens",
        )
        written += _series_plot(
            plt,
            rows,
            out / "timing.png",
            {k: k[5:] for k in TIMINGS},
            "seconds per iteration",
            stacked=True,
        )
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
