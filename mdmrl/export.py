"""Write evaluation images in the folder layouts that external evaluators read.

- ``geneval``: ``OUT/<prompt index:05d>/metadata.jsonl`` (the prompt's metadata line)
  and ``OUT/<prompt index:05d>/samples/<seed:04d>.png`` — the layout GenEval's
  ``evaluate_images.py`` walks.
- ``dpg``: ``OUT/<prompt id>.png``, the prompt's samples tiled in a square grid (DPG-Bench
  crops each image back into its tiles; use 4 seeds for its 2x2 grid).
- ``plain``: ``OUT/<prompt index:05d>_<seed:02d>.png``.

Those evaluators need their own environments and detector/VQA weights; mdmrl only
writes the images (see docs/evaluation.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mdmrl.errors import UserError

LAYOUTS = ("geneval", "dpg", "plain")


def read_geneval_metadata(path: Path) -> tuple[list[str], list[dict]]:
    """GenEval's evaluation_metadata.jsonl: one JSON object with a "prompt" per line."""
    prompts, meta = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{n}: not a JSON line ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise UserError(f'{path}:{n}: expected an object with a "prompt" string')
        prompts.append(obj["prompt"])
        meta.append(obj)
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts, meta


def read_dpg_folder(path: Path) -> tuple[list[str], list[str]]:
    """DPG-Bench prompts: a folder of ``<id>.txt`` files, one prompt each."""
    files = sorted(path.glob("*.txt"))
    if not files:
        raise UserError(f"{path}: no .txt prompt files (DPG-Bench layout: one <id>.txt per prompt)")
    return [f.read_text(encoding="utf-8").strip() for f in files], [f.stem for f in files]


class ImageWriter:
    """Collects (prompt, seed) images from :func:`mdmrl.evaluate.evaluate` and writes them."""

    def __init__(
        self,
        out: Path,
        layout: str,
        prompts: list[str],
        seeds: int,
        metadata: list[dict] | None = None,
        ids: list[str] | None = None,
    ):
        if layout not in LAYOUTS:
            raise UserError(f"--layout: {layout!r} is not allowed; choose one of: {', '.join(LAYOUTS)}")
        self.out, self.layout, self.prompts, self.seeds = out, layout, prompts, seeds
        self.metadata = metadata or [{"prompt": p} for p in prompts]
        self.ids = ids or [f"{i:05d}" for i in range(len(prompts))]
        self._tiles: dict[int, dict[int, torch.Tensor]] = {}
        out.mkdir(parents=True, exist_ok=True)

    def __call__(self, prompt_index: int, seed_index: int, image: torch.Tensor) -> None:
        if self.layout == "geneval":
            folder = self.out / f"{prompt_index:05d}"
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            (folder / "metadata.jsonl").write_text(json.dumps(self.metadata[prompt_index]) + "\n")
            _save(image, folder / "samples" / f"{seed_index:04d}.png")
        elif self.layout == "plain":
            _save(image, self.out / f"{prompt_index:05d}_{seed_index:02d}.png")
        else:
            tiles = self._tiles.setdefault(prompt_index, {})
            tiles[seed_index] = image
            if len(tiles) == self.seeds:
                _save(
                    _tile([tiles[s] for s in range(self.seeds)]), self.out / f"{self.ids[prompt_index]}.png"
                )
                del self._tiles[prompt_index]


def _tile(images: list[torch.Tensor]) -> torch.Tensor:
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    c, h, w = images[0].shape
    sheet = torch.zeros(c, rows * h, cols * w)
    for k, img in enumerate(images):
        r, q = divmod(k, cols)
        sheet[:, r * h : (r + 1) * h, q * w : (q + 1) * w] = img
    return sheet


def _save(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(path)
