"""``mdmrl export``: a trained model as a standalone folder, in its own family's format.

The command takes a run directory (its newest complete checkpoint, as ``mdmrl eval
--checkpoint`` does) or a checkpoint folder, builds the run's backbone and schedule
policy from the run's recipe on the CPU, loads the checkpoint's trained weights into
them and asks the backbone to write itself (:meth:`mdmrl.interfaces.Backbone.export`):
a diffusers folder, a LLaDA checkpoint folder, a safetensors file with its config.
The weights come from ``backbone.safetensors`` / ``schedule.safetensors``; a checkpoint
that holds only its ``sharded/`` folder (torch.distributed.checkpoint, written by an
FSDP run) is gathered here, in this one process, from the shards' model entries.

Beside what the backbone writes, the folder gets ``mdmrl-export.json`` (where it came
from and how to load it) and, when the schedule policy has trained weights (Co-GRPO's
learned schedule), ``mdmrl-schedule.safetensors``. The folder is written under a
temporary name next to ``--out`` and renamed into place when complete; the run
directory is only read.

:func:`merged_state_dict` is for backbones: the state dict of a module whose peft LoRA
layers are folded into their base weights, under the key names of the module without
adapters.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from mdmrl import checkpoint as ckpt
from mdmrl.errors import UserError

#: Written into every exported folder: its origin and how to load it.
EXPORT_INFO = "mdmrl-export.json"
#: The trained schedule policy's weights (mdmrl's own; no other library reads them).
SCHEDULE_FILE = "mdmrl-schedule.safetensors"
#: Where the trained modules' entries live in a sharded checkpoint's model state.
SHARD_ROOT = "model"


# --------------------------------------------------------------------------- finding the checkpoint


def find_checkpoint(source: str) -> tuple[Path, Path]:
    """(checkpoint folder, run directory) of ``source``: a run directory gives its
    newest complete checkpoint, a checkpoint folder is taken as is (its run directory
    is two levels up, ``RUN_DIR/checkpoints/iter_N``), as ``mdmrl eval --checkpoint``
    reads them. UserError (one line) otherwise."""
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found (give a run directory or a checkpoint folder)")
    if not path.is_dir():
        raise UserError(f"{path}: not a folder (give a run directory or a checkpoint folder)")
    if (path / "checkpoints").is_dir() or (path / "recipe.toml").is_file():
        found = ckpt.list_checkpoints(path / "checkpoints")
        if not found:
            raise UserError(f"{path}/checkpoints: no complete checkpoint")
        return found[-1], path
    if not (path / "meta.json").is_file():
        raise UserError(
            f"{path}: neither a run directory (no checkpoints/) nor a checkpoint folder (no meta.json)"
        )
    return path, path.parent.parent


def _inside(a: Path, b: Path) -> bool:
    """True when ``a`` is ``b`` or lies inside it."""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def check_output(out: Path, force: bool, protected: list[Path]) -> None:
    """``--out`` may be a new folder, an empty one, or (``force``) a non-empty one that
    holds none of ``protected`` and lies inside none of them. UserError otherwise."""
    for p in protected:
        if _inside(out, p):
            raise UserError(f"--out {out}: lies inside {p}, which export only reads; choose another folder")
        if _inside(p, out):
            raise UserError(f"--out {out}: holds {p}, which export only reads; choose another folder")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out}: exists and is not a folder; choose another path")
        if any(out.iterdir()) and not force:
            raise UserError(f"--out {out}: folder exists and is not empty; add --force to replace it")


# --------------------------------------------------------------------------- reading the weights


def read_shards(folder: Path, wanted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries ``wanted`` (name -> a tensor of the expected shape and dtype, e.g. the
    module's parameter) of the model state in a torch.distributed.checkpoint folder,
    gathered whole in this process. UserError naming the folder when it is not such a
    checkpoint or lacks an entry, or an entry's shape differs."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - a missing or unreadable .metadata file, any cause
        raise UserError(
            f"{folder}: not a readable torch.distributed.checkpoint folder ({type(exc).__name__}); "
            "export reads FSDP shards only"
        ) from None
    entries = metadata.state_dict_metadata
    target: dict[str, torch.Tensor] = {}
    for name, like in wanted.items():
        found = entries.get(f"{SHARD_ROOT}.{name}")
        if not isinstance(found, TensorStorageMetadata):
            missing = [n for n in wanted if f"{SHARD_ROOT}.{n}" not in entries]
            raise UserError(
                f"{folder}: the shards lack {len(missing)} of the recipe's trained tensors, e.g. {missing[0]!r}"
            )
        if tuple(found.size) != tuple(like.shape):
            raise UserError(
                f"{folder}: tensor {name} has shape {tuple(found.size)}, the model expects {tuple(like.shape)}"
            )
        target[name] = torch.empty(tuple(found.size), dtype=found.properties.dtype)
    if target:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore")
            load({SHARD_ROOT: target}, storage_reader=FileSystemReader(str(folder)), no_dist=True)
    return target


def load_checkpoint_weights(path: Path, backbone: torch.nn.Module, schedule: torch.nn.Module) -> str:
    """Copy a checkpoint's trained weights into the modules; returns where they came
    from: ``"safetensors"`` (the whole weights every checkpoint holds) or ``"sharded"``
    (only the ``sharded/`` folder was there)."""
    if (path / "backbone.safetensors").is_file():
        ckpt._load_into(backbone, path / "backbone.safetensors")
        if (path / "schedule.safetensors").is_file():
            ckpt._load_into(schedule, path / "schedule.safetensors")
        return "safetensors"
    shards = path / ckpt.SHARDED
    if not shards.is_dir():
        raise UserError(f"{path}: holds neither backbone.safetensors nor a {ckpt.SHARDED}/ folder")
    modules = {"backbone": backbone, "schedule": schedule}
    wanted = {
        f"{prefix}.{k}": v
        for prefix, m in modules.items()
        for k, v in m.named_parameters()
        if v.requires_grad
    }
    tensors = read_shards(shards, wanted)
    with torch.no_grad():
        for prefix, m in modules.items():
            for k, v in m.named_parameters():
                if v.requires_grad:
                    v.copy_(tensors[f"{prefix}.{k}"])
    return "sharded"


# --------------------------------------------------------------------------- LoRA


def _is_lora_layer(module: torch.nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "get_delta_weight")


def merged_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` (detached) with every peft LoRA layer folded into its base
    layer: ``<layer>.weight`` = base weight + the active adapters' delta (B A times
    the scaling), the adapters' own entries left out and ``<layer>.base_layer.<x>``
    named ``<layer>.<x>``, i.e. the keys of the module without adapters. The module is
    not changed. A module without LoRA layers gives its plain state dict. ValueError
    for adapters a delta weight does not describe (DoRA, LoRA biases)."""
    state = {k: v.detach() for k, v in module.state_dict().items()}
    layers = {name: m for name, m in module.named_modules() if _is_lora_layer(m)}
    if not layers:
        return state
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        owner = next((n for n in layers if key.startswith(f"{n}.")), None)
        if owner is None:
            out[key] = value
        elif key.startswith(f"{owner}.base_layer."):
            out[f"{owner}.{key[len(owner) + len('.base_layer.') :]}"] = value
    with torch.no_grad():
        for name, layer in layers.items():
            if getattr(layer, "disable_adapters", False):
                continue
            merged = set(getattr(layer, "merged_adapters", []))
            for adapter in layer.active_adapters:
                if adapter not in layer.lora_A or adapter in merged:
                    continue
                if getattr(layer, "use_dora", {}).get(adapter) or getattr(layer, "lora_bias", {}).get(
                    adapter
                ):
                    raise ValueError(f"{name}: adapter {adapter!r} uses DoRA or a LoRA bias; not merged here")
                key = f"{name}.weight"
                base = out[key]
                out[key] = (base.float() + layer.get_delta_weight(adapter).float()).to(base.dtype)
    return out


# --------------------------------------------------------------------------- the command


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path / 'meta.json'}: corrupt or missing checkpoint metadata ({exc})") from None


def export_command(
    source: str,
    out: str,
    force: bool = False,
    recipe: str | None = None,
    overrides: list[str] | None = None,
) -> Path:
    """Write the trained model of ``source`` (run directory or checkpoint folder) into
    the folder ``out``; returns it. ``recipe`` replaces the run directory's
    ``recipe.toml``; ``overrides`` (``key=value``) apply to it, e.g. a base model that
    has moved (``backbone.options.path=...``)."""
    from safetensors.torch import save_file

    from mdmrl import recipe as rc
    from mdmrl.build import build_part, parts_seed
    from mdmrl.interfaces import Backbone, BuildContext
    from mdmrl.plugins import get_registry

    path, run_dir = find_checkpoint(source)
    target = Path(out)
    check_output(target, force, [path, run_dir] if (run_dir / "checkpoints").is_dir() else [path])
    meta = _read_meta(path)
    if recipe is None:
        recipe_path = run_dir / "recipe.toml"
        if not recipe_path.is_file():
            raise UserError(
                f"{path}: its run directory {run_dir} has no recipe.toml; give the recipe with --recipe"
            )
        loaded = rc.load(recipe_path, overrides or [], run_dir=True)
    else:
        loaded = rc.load(recipe, overrides or [])
    r = loaded.recipe
    cls = get_registry().get("backbone", r.backbone.name).cls
    if getattr(cls, "export", Backbone.export) is Backbone.export:
        raise UserError(f"backbone {r.backbone.name!r} cannot export (it has no export method)")

    ctx = BuildContext(device=torch.device("cpu"), backbone=None, recipe_dir=loaded.directory)
    with torch.random.fork_rng(devices=[]):  # as build_parts builds them (random inits included)
        torch.manual_seed(parts_seed(r.seed))
        backbone = build_part(loaded, "backbone", "backbone", r.backbone.name, ctx)
        ctx.backbone = backbone
        schedule = build_part(loaded, "schedule", "schedule", r.schedule.name, ctx)
    origin = load_checkpoint_weights(path, backbone, schedule)
    backbone.eval()
    schedule.eval()

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.export-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        with torch.no_grad():
            described = backbone.export(staging) or {}
        info: dict[str, Any] = {
            "backbone": r.backbone.name,
            "checkpoint": str(path.resolve()),
            "iteration": meta.get("iteration"),
            "weights_read_from": "sharded/ (gathered)" if origin == "sharded" else "backbone.safetensors",
            **described,
        }
        trained = ckpt.trainable_state(schedule)
        if trained:
            save_file(trained, str(staging / SCHEDULE_FILE), metadata={"format": "pt"})
            info["schedule"] = {"name": r.schedule.name, "file": SCHEDULE_FILE}
        (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
