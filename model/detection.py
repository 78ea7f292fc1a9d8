"""Decode PaliGemma detection / segmentation output into boxes in pixel coordinates.

PaliGemma answers `detect cat ; dog` with entries `<locY0><locX0><locY1><locX1> label` joined by ` ; `
(big_vision `pp/proj/paligemma`, the PaliGemma README and colab). Each `<locNNNN>` (0..1023) is a coordinate
binned into 1024 steps of the image side: pixel = NNNN / 1024 * side, in (y, x) order. A `segment` answer puts 16
`<segNNN>` codebook tokens (a VQ-VAE mask code, not decoded here) between the box and the label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Box", "parse_detections", "loc_tokens"]

NUM_LOC = 1024

# One entry: four <loc> tokens, optionally 16 <seg> tokens, then a label up to the next ";" or "<".
_ENTRY = re.compile(
    r"<loc(\d{4})>" * 4 + r"\s*" + r"((?:<seg\d{3}>){16})?" + r"\s*([^;<]*)"
)
_SEG = re.compile(r"<seg(\d{3})>")


@dataclass(frozen=True)
class Box:
    label: str
    x0: float  # pixel coordinates, top-left origin; x0 <= x1 and y0 <= y1 unless the model emitted them swapped
    y0: float
    x1: float
    y1: float
    seg: tuple[int, ...] | None = None  # 16 mask codes for `segment` answers

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


def parse_detections(text: str, width: int, height: int) -> list[Box]:
    """Every `<loc>x4 [<seg>x16] label` entry of `text` (decoded with <loc> tokens kept), scaled to width x height.

    Text that is not part of an entry is ignored, so a truncated answer yields the complete entries only.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    boxes = []
    for m in _ENTRY.finditer(text):
        y0, x0, y1, x1 = (int(v) for v in m.group(1, 2, 3, 4))
        if max(y0, x0, y1, x1) >= NUM_LOC:  # \d{4} also matches 1024..9999, which are not location tokens
            continue
        seg = tuple(int(s) for s in _SEG.findall(m.group(5))) if m.group(5) else None
        boxes.append(Box(
            label=m.group(6).strip(),
            x0=x0 / NUM_LOC * width, y0=y0 / NUM_LOC * height,
            x1=x1 / NUM_LOC * width, y1=y1 / NUM_LOC * height,
            seg=seg,
        ))
    return boxes


def loc_tokens(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> str:
    """The four <loc> tokens for a pixel box (the inverse of `parse_detections` up to the 1/1024 binning)."""
    def q(v: float, side: int) -> int:
        return min(NUM_LOC - 1, max(0, int(v / side * NUM_LOC)))

    return "".join(f"<loc{q(v, s):04d}>" for v, s in ((y0, height), (x0, width), (y1, height), (x1, width)))
