"""Experiment trackers: TensorBoard and Weights & Biases, through accelerate's tracker
classes (``accelerate.tracking.TensorBoardTracker`` / ``WandBTracker``).

``metrics.jsonl`` and ``metrics.csv`` stay the run's record (resume truncates and
reads them); the trackers receive a copy of every metrics row, on the main process
only, with the iteration as the step. Which trackers: ``logging.trackers`` of the
run's resolved recipe, without ``tensorboard`` when ``logging.tensorboard = false``.

Resume. A run resumes from its last checkpoint and writes again the rows of the
iterations after it, which the trackers may already hold:

- TensorBoard: the writer is opened with ``purge_step`` = the first iteration written
  again, so TensorBoard discards the events of that iteration and later ones written
  before the interruption, and shows the new ones once;
- Weights & Biases never goes back in steps: a step at or below the run's current
  step is dropped (with a warning). The resumed run continues the same W&B run (its
  id is kept in ``trackers.json`` in the run directory; ``resume="allow"``). Online,
  every row from the resume point on is sent and W&B keeps the copy it already has.
  Offline (``WANDB_MODE=offline``) each process start writes its own
  ``offline-run-*-<id>`` folder and W&B cannot know what an earlier folder holds, so
  mdmrl reads the last step stored in those folders and sends only later rows: first
  the rows of ``metrics.jsonl`` the folders lack (a start killed with SIGKILL loses
  what W&B's own process had not yet written), then the new ones. Under exact resume a
  row written again equals the one written before.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tomllib

from mdmrl.errors import UserError

#: Tracker names accepted by ``logging.trackers``.
TRACKERS = ("tensorboard", "wandb")
#: The W&B run id of the run, in the run directory.
STATE_FILE = "trackers.json"
#: The package each tracker needs, and how to install it.
REQUIRES = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install -e '.[wandb]'"),
}


def resolve(trackers: Sequence[str], tensorboard: bool = True) -> list[str]:
    """The trackers a run uses: ``trackers`` in order, each once, without
    ``tensorboard`` when ``tensorboard`` (``logging.tensorboard``) is false."""
    out: list[str] = []
    for name in trackers:
        if name not in TRACKERS:
            raise UserError(f"logging.trackers: {name!r} is not a tracker; choose from {', '.join(TRACKERS)}")
        if name not in out and (tensorboard or name != "tensorboard"):
            out.append(name)
    return out


def from_run_dir(run_dir: Path, tensorboard: bool = True) -> list[str]:
    """The trackers named by ``[logging]`` of the run directory's resolved
    ``recipe.toml``; ``["tensorboard"]`` (or none, with ``tensorboard`` false) when the
    file or the key is absent."""
    logging = _recipe(run_dir).get("logging", {})
    names = logging.get("trackers", ["tensorboard"])
    return resolve(names, tensorboard and logging.get("tensorboard", True))


def check_installed(names: Sequence[str]) -> None:
    """One UserError line naming the tracker whose package is missing."""
    for name in names:
        module, how = REQUIRES[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"logging.trackers: {name!r} needs the {module} package, which is not installed ({how})"
            )


def _recipe(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "recipe.toml"
    if not path.is_file():
        return {}
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row, without its ``iteration`` (the step)."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def wandb_offline() -> bool:
    return os.environ.get("WANDB_MODE", "").strip().lower() in ("offline", "dryrun")


def wandb_history(record_file: str | Path) -> list[dict[str, Any]]:
    """The history rows (``_step`` and the logged values) W&B stored in one run's
    ``run-<id>.wandb`` record file."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(str(record_file))
    rows = []
    while (data := store.scan_data()) is not None:
        record = pb.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items})
    return rows


def wandb_offline_files(root: str | Path, run_id: str) -> list[str]:
    """The record files of the offline starts of W&B run ``run_id`` under ``root``
    (the ``dir`` given to W&B), oldest first."""
    pattern = os.path.join(str(root), "wandb", "offline-run-*", f"run-{run_id}.wandb")

    def start_order(path: str) -> tuple[str, int]:
        # offline-run-<YYYYmmdd_HHMMSS>-<id>[-<n>]: W&B adds "-<n>" when a start falls in
        # the same second as an earlier one of the same run
        timespec, _, rest = Path(path).parent.name.removeprefix("offline-run-").partition("-")
        suffix = rest.removeprefix(run_id).removeprefix("-")
        return timespec, int(suffix) if suffix.isdigit() else 0

    return sorted(glob.glob(pattern), key=start_order)


class Trackers:
    """The accelerate trackers of one process start of a run (main process only).

    run_dir: the run directory (TensorBoard writes ``tb/``; W&B writes ``wandb/``
    unless WANDB_DIR is set). names: from :func:`resolve`. first_step: the first
    iteration this start writes (1, or the one after the checkpoint it resumes).
    history: the rows of ``metrics.jsonl`` before ``first_step`` (offline W&B is
    brought up to date from them)."""

    def __init__(
        self, run_dir: Path, names: Sequence[str], first_step: int = 1, history: Iterable[dict] = ()
    ):
        from accelerate import PartialState

        check_installed(names)
        self.run_dir = Path(run_dir)
        self.trackers: dict[str, Any] = {}
        #: per tracker, the steps it already holds (rows at or below are not sent)
        self.held: dict[str, int] = {}
        if not PartialState().is_main_process:
            return
        for name in names:
            tracker = getattr(self, f"_start_{name}")(first_step)
            tracker.start()
            self.trackers[name] = tracker
            self.held.setdefault(name, 0)
        for row in history:
            if row["iteration"] < first_step:
                self.log(row, only=("wandb",))

    def _start_tensorboard(self, first_step: int):
        from accelerate.tracking import TensorBoardTracker

        purge = {"purge_step": first_step} if first_step > 1 else {}
        return TensorBoardTracker("tb", str(self.run_dir), **purge)

    def _start_wandb(self, first_step: int):
        from accelerate.tracking import WandBTracker

        state_path = self.run_dir / STATE_FILE
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        if "wandb_id" not in state:
            import wandb

            state["wandb_id"] = wandb.util.generate_id()
            state_path.write_text(json.dumps(state) + "\n")
        root = os.environ.get("WANDB_DIR") or str(self.run_dir)
        if wandb_offline():  # what the earlier starts' folders hold
            steps = [
                r.get("_step", 0)
                for f in wandb_offline_files(root, state["wandb_id"])
                for r in wandb_history(f)
            ]
            self.held["wandb"] = int(max(steps, default=0))
        kwargs: dict[str, Any] = {"name": self.run_dir.name, "id": state["wandb_id"], "resume": "allow"}
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(self.run_dir)
        config = _recipe(self.run_dir)
        if config:
            kwargs["config"] = config
        return WandBTracker(os.environ.get("WANDB_PROJECT", "mdmrl"), **kwargs)

    def log(self, row: dict[str, Any], only: Sequence[str] = TRACKERS) -> None:
        """Send one metrics row (step = its ``iteration``) to every tracker (of
        ``only``) that does not hold that step yet."""
        step = int(row["iteration"])
        values = scalars(row)
        for name, tracker in self.trackers.items():
            if name in only and step > self.held[name]:
                tracker.log(values, step=step)
                self.held[name] = step

    def close(self) -> None:
        for tracker in self.trackers.values():
            tracker.finish()
        self.trackers = {}
