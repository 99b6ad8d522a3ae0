"""Atomic checkpoints: weights in safetensors, optimizer and RNG states in a
``weights_only`` torch file, metadata in JSON.

Layout of ``RUN_DIR/checkpoints/iter_000012/`` (12 iterations completed):
``backbone.safetensors`` (trainable backbone parameters), ``schedule.safetensors``,
``state.pt`` (optimizers, LR schedulers, every RNG state), ``meta.json``
(iteration, phase position, counters, resolved-recipe digest). A run whose model and
optimizer states are split across processes (FSDP) adds ``sharded/``: every rank's
shards of the model and of the optimizers (torch.distributed.checkpoint), which its
resume reads; the safetensors files hold the whole weights all the same, so
evaluation, sampling and export read any checkpoint alike. A checkpoint is written
into a temporary folder, every file fsynced, then renamed into place, so a crash (even
SIGKILL mid-write) leaves either the old set or the new one, never half.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mdmrl.errors import UserError

_NAME = re.compile(r"^iter_(\d{6,})$")
SHARDED = "sharded"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes (requires_grad), contiguous, on CPU."""
    return {k: v.detach().to("cpu").contiguous() for k, v in module.named_parameters() if v.requires_grad}


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def staging(root: Path, iteration: int, create: bool) -> Path:
    """The temporary folder of checkpoint ``iteration`` that several processes fill
    (the same path on every rank); ``create``: the one process that empties and makes it."""
    tmp = root / f".tmp-iter_{iteration:06d}-shared"
    if create:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    return tmp


def save(
    root: Path,
    iteration: int,
    backbone: torch.nn.Module,
    schedule: torch.nn.Module,
    state: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
    staging: Path | None = None,
) -> Path:
    """Write checkpoint ``iter_<iteration>`` atomically and keep the last ``keep``.
    ``staging``: a temporary folder that other processes already wrote into."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter_{iteration:06d}"
    tmp = staging or root / f".tmp-iter_{iteration:06d}-{os.getpid()}"
    if staging is None:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    save_file(trainable_state(backbone), str(tmp / "backbone.safetensors"))
    save_file(trainable_state(schedule), str(tmp / "schedule.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    for f in tmp.rglob("*"):  # sharded/ holds a folder of its own
        if f.is_file():
            _fsync_file(f)
        else:
            _fsync_dir(f)
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same iteration (e.g. Ctrl-C right after a save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-iter_*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _load_into(module: torch.nn.Module, path: Path) -> None:
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: corrupt or unreadable checkpoint file ({exc})") from None
    own = dict(module.named_parameters())
    expected = {k for k, v in own.items() if v.requires_grad}
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors))[:3]
        extra = sorted(set(tensors) - expected)[:3]
        raise UserError(
            f"{path}: checkpoint does not match the recipe's model (missing {missing}, unexpected {extra})"
        )
    with torch.no_grad():
        for k, v in tensors.items():
            if own[k].shape != v.shape:
                raise UserError(
                    f"{path}: tensor {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}"
                )
            own[k].copy_(v)


def read(path: Path) -> tuple[dict, dict]:
    """(state, meta) of a checkpoint, without its weights. Bad files raise UserError."""
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{meta_path}: corrupt or missing checkpoint metadata ({exc})") from None
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable state is a user-facing error
        raise UserError(f"{path / 'state.pt'}: corrupt or unreadable checkpoint state ({exc})") from None
    return state, meta


def load(path: Path, backbone: torch.nn.Module, schedule: torch.nn.Module) -> tuple[dict, dict]:
    """Load weights into the modules; return (state, meta). Bad files raise UserError."""
    state, meta = read(path)
    _load_into(backbone, path / "backbone.safetensors")
    _load_into(schedule, path / "schedule.safetensors")
    return state, meta
