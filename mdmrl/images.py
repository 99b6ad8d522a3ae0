"""Image grids as PNG files (PIL only)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch


def save_grid(images: torch.Tensor, captions: list[str], path: Path, columns: int = 8) -> None:
    """images float [B, 3, H, W] in [0, 1] -> one PNG with each caption under its image."""
    from PIL import Image, ImageDraw

    b, _, h, w = images.shape
    columns = max(1, min(columns, b))
    rows = (b + columns - 1) // columns
    cap_h = 34
    sheet = Image.new("RGB", (columns * (w + 4), rows * (h + cap_h + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(b):
        r, c = divmod(i, columns)
        x, y = c * (w + 4) + 2, r * (h + cap_h + 4) + 2
        sheet.paste(Image.fromarray(arr[i]), (x, y))
        text = "\n".join(textwrap.wrap(captions[i] if i < len(captions) else "", width=max(8, w // 6))[:3])
        draw.text((x, y + h + 1), text, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
