"""Run directories: one folder per run holding everything needed to read or resume it.

``recipe.toml`` (resolved, every default filled in), ``environment.json`` (versions,
git commit, command), ``metrics.jsonl`` and ``metrics.csv``, ``tb/`` (TensorBoard),
``wandb/`` (Weights & Biases) and ``trackers.json`` (their resume state), ``images/``,
``eval/``, ``plots/``, ``checkpoints/``.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from mdmrl import hostmem, tracking
from mdmrl.errors import UserError

PACKAGES = (
    "mdmrl",
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "open_clip_torch",
    "pluggy",
    "safetensors",
)


def default_run_dir(recipe_path: str) -> Path:
    stem = Path(recipe_path).stem
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare(path: Path, overwrite: bool) -> None:
    """Check that ``path`` can become a new run directory, without creating it."""
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path}: exists and is not a directory; choose another --run-dir")
        if any(path.iterdir()) and not overwrite:
            raise UserError(
                f"{path}: run directory already exists; use --resume {path} to continue it "
                "or --overwrite to replace it"
            )
    parent = path.parent if not path.exists() else path
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise UserError(f"{path}: cannot create the run directory ({parent} is not writable)")


def create(path: Path, overwrite: bool) -> None:
    prepare(path, overwrite)
    if path.exists() and overwrite:
        shutil.rmtree(path)
    for sub in ("checkpoints", "images", "eval", "plots"):
        (path / sub).mkdir(parents=True, exist_ok=True)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "git_commit": _git_commit(),
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "keep_freed_memory": hostmem.state(),  # mdmrl/hostmem.py: allocator setting of this process
    }


class MetricsLog:
    """Metrics as JSON lines (the source of truth) and a CSV rewritten from them; every
    row also goes to the run's experiment trackers (:mod:`mdmrl.tracking`).

    tensorboard: ``logging.tensorboard``. trackers: the tracker names (the engine
    passes ``logging.trackers``); None reads them from the run directory's resolved
    ``recipe.toml``. The trackers are opened at the first
    :meth:`append`, once :meth:`truncate` has said from which iteration the run writes
    again (TensorBoard discards its events from there on)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, trackers: list[str] | None = None):
        self.run_dir = run_dir
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.rows: list[dict] = []
        if self.jsonl.exists():
            self.rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]
        if trackers is None:
            self.tracker_names = tracking.from_run_dir(run_dir, tensorboard)
        else:
            self.tracker_names = tracking.resolve(trackers, tensorboard)
        tracking.check_installed(
            self.tracker_names
        )  # a missing package stops the run before its first iteration
        self._first = max((r["iteration"] for r in self.rows), default=0) + 1
        self._trackers: tracking.Trackers | None = None

    def truncate(self, iteration: int) -> None:
        """Drop rows of iterations >= ``iteration`` (written after the checkpoint a
        resumed run continues from)."""
        self.rows = [r for r in self.rows if r["iteration"] < iteration]
        self._first = iteration
        self._write_all()

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self._write_csv()
        if self.tracker_names and self._trackers is None:
            self._trackers = tracking.Trackers(
                self.run_dir, self.tracker_names, first_step=self._first, history=self.rows
            )
        if self._trackers is not None:
            self._trackers.log(row)

    def _write_all(self) -> None:
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self._write_csv()

    def _write_csv(self) -> None:
        keys: list[str] = []
        for r in self.rows:
            keys.extend(k for k in r if k not in keys)
        tmp = self.csv.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.csv)

    def close(self) -> None:
        if self._trackers is not None:
            self._trackers.close()
            self._trackers = None
