"""Run directories: one folder per run holding everything needed to read or resume it.

``recipe.toml`` (resolved, every default filled in), ``environment.json`` (versions,
git commit, command), ``metrics.jsonl`` and ``metrics.csv``, ``tb/`` (TensorBoard),
``images/``, ``eval/``, ``plots/``, ``checkpoints/``.
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

from mdmrl import hostmem
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
    """Metrics as JSON lines (the source of truth) and a CSV rewritten from them."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.rows: list[dict] = []
        if self.jsonl.exists():
            self.rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))

    def truncate(self, iteration: int) -> None:
        """Drop rows of iterations >= ``iteration`` (written after the checkpoint a
        resumed run continues from)."""
        self.rows = [r for r in self.rows if r["iteration"] < iteration]
        self._write_all()

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self._write_csv()
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self._tb.add_scalar(k, v, row["iteration"])
            self._tb.flush()

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
        if self._tb is not None:
            self._tb.close()
