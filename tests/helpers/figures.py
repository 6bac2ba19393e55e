"""A figure check with content: the file is a PNG of at least the given size that draws something (more than one
colour), rather than only a file size."""

from __future__ import annotations

from pathlib import Path


def assert_drawn_png(path: Path, min_width: int = 200, min_height: int = 150) -> None:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG", (path, im.format)
        assert im.width >= min_width and im.height >= min_height, (path, im.size)
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels[:: max(1, len(pixels) // 20000)], axis=0)) > 1, f"{path} is blank"
