"""Shared pieces of the reward-model plug-ins: device and path resolution, hub look-ups
that never hang, weight loading, image preprocessing on tensors, and a base class that
loads its model once and scores in chunks.

Only ``torch`` and the core are imported here at module level; torchvision and
huggingface_hub are imported inside the functions that use them, so registering the
plug-in stays cheap.

Images are float [B, 3, H, W] in [0, 1] throughout (the layout of
:attr:`mdmrl.interfaces.GeneratedBatch.images`).
"""

from __future__ import annotations

import os
import pickle
import threading
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mdmrl.errors import UserError
from mdmrl.interfaces import GeneratedBatch, Rewarder

#: Mean and standard deviation of OpenAI's CLIP preprocessing (also used by BLIP,
#: ImageReward and HPSv2).
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_TRUE = {"1", "ON", "YES", "TRUE"}


# -- devices and paths ------------------------------------------------------------------
def resolve_device(value: str | None, default: torch.device, reward: str) -> torch.device:
    """The device a reward model runs on: ``value`` when given, else ``default`` (the
    trainer's device). Raises :class:`UserError` for a malformed name or a CUDA device
    on a machine without one."""
    if value is None:
        return torch.device(default)
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise UserError(
            f'{reward}: option device = "{value}" is not a torch device; use "cpu", "cuda" or "cuda:N"'
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f'{reward}: option device = "{value}" but no CUDA device is available; use "cpu"')
    return device


def local_path(value: str, recipe_dir: str = ".") -> str | None:
    """``value`` as an existing file or folder: as given (``~`` expanded), or relative to
    the recipe's folder. None when neither exists."""
    expanded = os.path.expanduser(value)
    candidates = [expanded]
    if not os.path.isabs(expanded):
        candidates.append(os.path.join(recipe_dir, expanded))
    for cand in candidates:
        if os.path.exists(cand):
            return os.path.abspath(cand)
    return None


def looks_like_path(value: str) -> bool:
    """True when ``value`` cannot be a hub repo id ("name" or "owner/name") and so
    must be meant as a local path."""
    return (
        value.startswith((".", "~", os.sep))
        or os.path.isabs(value)
        or value.count("/") > 1
        or (os.sep != "/" and os.sep in value)
    )


# -- the Hugging Face hub -----------------------------------------------------------------
def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for no network."""
    if any(
        os.environ.get(v, "").strip().upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_hub_file(repo: str, filename: str) -> str | None:
    """Path of ``filename`` of hub repo ``repo`` in the local hub cache, or None. Never
    touches the network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename)
    return found if isinstance(found, str) and os.path.isfile(found) else None


def hub_file(repo: str, filename: str) -> str | None:
    """Local path of a hub file: from the cache, else downloaded unless the hub is
    offline. None when it cannot be had (the caller raises its own message)."""
    found = cached_hub_file(repo, filename)
    if found is not None or hub_offline():
        return found
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id=repo, filename=filename)
    except Exception:  # noqa: BLE001 - any failure means "not available"; the caller explains
        return None


def download_hint(repo: str, filename: str | None = None) -> str:
    """The shell command that fetches a hub file (or a whole repo) into a folder."""
    target = f"{repo} {filename}" if filename else repo
    return f"`huggingface-cli download {target} --local-dir DIR`"


def missing_weights(reward: str, what: str, repo: str, filename: str | None, option: str) -> str:
    """One clause naming what to download and which option to point at it."""
    where = f"{filename} from the Hugging Face hub repo {repo}" if filename else f"the hub repo {repo}"
    target = f"DIR/{filename}" if filename else "DIR"
    return (
        f"{what} not found: download {where} ({download_hint(repo, filename)}) and set option "
        f'{option} = "{target}" of the [[rewards]] entry named "{reward}"'
    )


# -- weights ------------------------------------------------------------------------------
def load_weights(path: str, *, reward: str, allow_pickle: bool = False) -> Any:
    """``torch.load`` a checkpoint onto the CPU. Weights-only unless ``allow_pickle``;
    a checkpoint that needs arbitrary unpickling, or that is no checkpoint at all,
    raises :class:`UserError`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        if not allow_pickle and "unsupported global" in str(exc).lower():
            raise UserError(
                f"{reward}: {path} stores Python objects besides tensors, which a weights-only load "
                f"refuses; if you trust the file, set option allow_pickle = true"
            ) from None
        raise UserError(f"{reward}: {path} is not a torch checkpoint ({_first_line(exc)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"{reward}: {path} is not a torch checkpoint ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def describe_keys(keys: Sequence[str], limit: int = 3) -> str:
    """``n (first, second, ...)`` for a list of state-dict keys in a message."""
    shown = ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")
    return f"{len(keys)} ({shown})"


# -- images -------------------------------------------------------------------------------
def check_images(images: torch.Tensor, batch_size: int) -> None:
    """Raise ValueError unless ``images`` is float [batch_size, 3, H, W]."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != batch_size:
        raise ValueError(
            f"images must be [B={batch_size}, 3, H, W], got {tuple(images.shape)} for {batch_size} prompts"
        )
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor in [0, 1], got {images.dtype}")


def resize_shortest_center_crop(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize so the shorter side is ``size`` (bicubic, antialiased), then crop the
    centre. [B, 3, H, W] -> [B, 3, S, S] (or [B, 3, h, w] for a (h, w) ``size``)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    h, w = (size, size) if isinstance(size, int) else size
    short = min(h, w)
    if min(images.shape[-2:]) != short:
        images = TF.resize(images, short, interpolation=InterpolationMode.BICUBIC, antialias=True)
    if tuple(images.shape[-2:]) != (h, w):
        images = TF.center_crop(images, [h, w])
    return images


def resize_longest_pad(images: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """Resize so the longer side is ``size`` keeping the aspect ratio (bicubic,
    antialiased), then pad both sides evenly with ``fill`` to a square (the extra pixel
    of an odd padding goes right/bottom). [B, 3, H, W] -> [B, 3, size, size]."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    h, w = images.shape[-2:]
    scale = size / float(max(h, w))
    if scale != 1.0:
        new = [max(1, round(h * scale)), max(1, round(w * scale))]
        images = TF.resize(images, new, interpolation=InterpolationMode.BICUBIC, antialias=True)
    nh, nw = images.shape[-2:]
    pad_h, pad_w = size - nh, size - nw
    if pad_h or pad_w:
        images = TF.pad(images, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=fill)
    return images


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(images - mean) / std per channel. [B, 3, H, W] -> [B, 3, H, W]."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` covering range(n)."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


# -- the base class ------------------------------------------------------------------------
class CachedModelRewarder(Rewarder):
    """A rewarder backed by one neural reward model.

    The model is loaded once, on the first :meth:`score` (or an explicit :meth:`load`),
    under a lock so a background reward thread and the main thread never load it
    twice. :meth:`score` moves chunks of ``batch_size`` images to ``device``, scores
    them without gradients and returns float32 [B] on the CPU. Pickling drops the
    loaded model (a copy in another process loads its own).
    """

    def __init__(self, options: Any, device: torch.device):
        self.options = options
        self.device = torch.device(device)
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> Any:
        """The loaded model, loading it on the first call."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = self._load()
        return self._model

    @abstractmethod
    def _load(self) -> Any:
        """Build the model, load its weights and move it to ``self.device``."""

    @abstractmethod
    def _score_chunk(self, model: Any, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """images: float32 [b, 3, H, W] in [0, 1] on ``self.device``; prompts: b strings.
        Returns float [b]."""

    def score(self, batch: GeneratedBatch) -> torch.Tensor:
        """One score per sample: float32 [B] on the CPU."""
        prompts = list(batch.prompts)
        images = batch.images
        check_images(images, len(prompts))
        if not prompts:
            return torch.zeros(0, dtype=torch.float32)
        model = self.load()
        out = []
        with torch.no_grad():
            for part in chunks(len(prompts), self.options.batch_size):
                x = images[part].to(self.device, torch.float32).clamp(0.0, 1.0)
                out.append(self._score_chunk(model, x, prompts[part]).reshape(-1).to("cpu", torch.float32))
        return torch.cat(out)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_model"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
