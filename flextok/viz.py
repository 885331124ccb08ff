"""Pictures for reports: labelled image grids (Pillow) and metric-vs-k plots (matplotlib, Agg).

Owns: converting images in [-1, 1] to uint8, laying out a grid with column labels above and a
caption band under each row, and line plots written to PNG. Does not own: what is shown (jobs).
matplotlib is used through `Figure` + the Agg canvas only, never pyplot, so nothing global changes.

Grid layout (what `grid_size` computes): cells of `cell` pixels (images resized with nearest-neighbour
when smaller, so pixels stay visible), `PAD` pixels between and around cells, a header band of
`LINE_HEIGHT` pixels when there are column labels, and a band of `ROW_LABEL_LINES` lines under every
row when there are row labels.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PAD = 4
LINE_HEIGHT = 14
ROW_LABEL_LINES = 2
FONT_SIZE = 11
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (20, 20, 20)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {list(images.shape)}")
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.permute(0, 2, 3, 1).numpy()  # (B, H, W, C)
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def save_images(images: torch.Tensor, paths: Sequence[str | os.PathLike]) -> None:
    """Write each image (B, 3, H, W) in [-1, 1] to its own PNG."""
    arrays = to_uint8(images)
    if len(paths) != len(arrays):
        raise ValueError(f"{len(arrays)} images but {len(paths)} paths")
    for array, path in zip(arrays, paths):
        Image.fromarray(array).save(path)


def slug(text: str, max_len: int = 40) -> str:
    """A file-name-safe form of a label or prompt."""
    out = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return out[:max_len].rstrip("-") or "x"


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit_lines(text: str, font, width: int, max_lines: int) -> list[str]:
    """Word-wrap `text` into at most `max_lines` lines of `width` pixels; an ellipsis if cut."""
    words, lines, current = text.split(), [], ""
    for word in words:
        trial = f"{current} {word}".strip()
        if font.getlength(trial) <= width or not current:
            current = trial
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    lines = [line for line in lines if line] or [""]
    cut = len(lines) > max_lines
    lines = lines[:max_lines]
    for i, line in enumerate(lines):  # single words wider than the band, and the cut last line
        last = i == len(lines) - 1
        if font.getlength(line) > width or (cut and last):
            while line and font.getlength(line + "…") > width:
                line = line[:-1]
            lines[i] = line + "…"
    return lines


def grid_size(
    num_rows: int, num_cols: int, cell: int, *, row_labels: bool = False, col_labels: bool = False
) -> tuple[int, int]:
    """(width, height) in pixels of the grid `image_grid` draws."""
    width = num_cols * cell + (num_cols + 1) * PAD
    row_band = ROW_LABEL_LINES * LINE_HEIGHT if row_labels else 0
    height = num_rows * (cell + row_band) + (num_rows + 1) * PAD + (LINE_HEIGHT if col_labels else 0)
    return width, height


def image_grid(
    images: torch.Tensor | np.ndarray,
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    cell: int | None = None,
) -> Image.Image:
    """A grid of images (R, C, 3, H, W) in [-1, 1] (or (R, C, H, W, 3) uint8) with labels.

    Row labels are written in a band under each row, column labels in a band above the grid.
    `cell` defaults to the image size, at least 64 pixels so that labels fit.
    """
    if isinstance(images, torch.Tensor):
        if images.dim() != 5:
            raise ValueError(f"grid images must be (R, C, 3, H, W), got {list(images.shape)}")
        R, C = images.shape[:2]
        arrays = to_uint8(images.flatten(0, 1)).reshape(R, C, *images.shape[3:], 3)  # (R, C, H, W, 3)
    else:
        arrays = np.asarray(images, dtype=np.uint8)
        if arrays.ndim != 5 or arrays.shape[-1] != 3:
            raise ValueError(f"grid arrays must be (R, C, H, W, 3), got {arrays.shape}")
    R, C, H, W = arrays.shape[:4]
    if row_labels is not None and len(row_labels) != R:
        raise ValueError(f"{len(row_labels)} row labels for {R} rows")
    if col_labels is not None and len(col_labels) != C:
        raise ValueError(f"{len(col_labels)} column labels for {C} columns")
    cell = cell or max(64, H, W)
    width, height = grid_size(R, C, cell, row_labels=row_labels is not None, col_labels=col_labels is not None)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    top = PAD
    if col_labels is not None:
        for c, label in enumerate(col_labels):
            x = PAD + c * (cell + PAD)
            draw.text((x, top - PAD + 1), _fit_lines(str(label), font, cell, 1)[0], fill=TEXT_COLOUR, font=font)
        top += LINE_HEIGHT
    band = ROW_LABEL_LINES * LINE_HEIGHT if row_labels is not None else 0
    resample = Image.Resampling.NEAREST if cell >= max(H, W) else Image.Resampling.BICUBIC
    for r in range(R):
        y = top + r * (cell + band + PAD)
        for c in range(C):
            tile = Image.fromarray(arrays[r, c]).resize((cell, cell), resample)
            canvas.paste(tile, (PAD + c * (cell + PAD), y))
        if row_labels is not None:
            lines = _fit_lines(str(row_labels[r]), font, width - 2 * PAD, ROW_LABEL_LINES)
            for i, line in enumerate(lines):
                draw.text((PAD, y + cell + 1 + i * LINE_HEIGHT), line, fill=TEXT_COLOUR, font=font)
    return canvas


def save_grid(path: str | os.PathLike, images, **kwargs) -> Path:
    """`image_grid(images, **kwargs)` written as PNG (parent folders created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, **kwargs).save(p, format="PNG")
    return p


def plot_vs_k(
    path: str | os.PathLike,
    ks: Sequence[int],
    series: Mapping[str, Sequence[float]],
    *,
    ylabel: str,
    title: str = "",
    baselines: Mapping[str, float] | None = None,
) -> Path:
    """Line plot of each series against k (log2 x axis), dashed horizontal baselines; PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, values in series.items():
        ax.plot(list(ks), [float(v) for v in values], marker="o", label=name)
    for name, value in (baselines or {}).items():
        ax.axhline(float(value), linestyle="--", linewidth=1, color="grey")
        ax.annotate(name, (ks[0], float(value)), textcoords="offset points", xytext=(2, 3), fontsize=7, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ks))
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("tokens k")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, format="png")
    return p
