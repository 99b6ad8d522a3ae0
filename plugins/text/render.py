"""Text drawn as images: what a text backbone's ``decode`` returns, so that image grids
(``logging.image_every``, the evaluation grids, ``mdmrl sample``) show completions."""

from __future__ import annotations

import textwrap

import torch

#: Side of the square image one completion is drawn on, in pixels.
SIDE = 256
#: Characters per line and lines drawn (the default PIL font is about 6 x 11 pixels).
COLUMNS, ROWS = 40, 22


def text_images(texts: list[str], side: int = SIDE) -> torch.Tensor:
    """B strings -> float32 [B, 3, side, side] in [0, 1]: black text on white, wrapped
    at COLUMNS characters, the first ROWS lines."""
    import numpy as np
    from PIL import Image, ImageDraw

    out = []
    for text in texts:
        image = Image.new("RGB", (side, side), "white")
        draw = ImageDraw.Draw(image)
        lines = [w for para in text.splitlines() or [""] for w in textwrap.wrap(para, COLUMNS) or [""]]
        draw.multiline_text((4, 4), "\n".join(lines[:ROWS]), fill="black")
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out) if out else torch.zeros(0, 3, side, side)
