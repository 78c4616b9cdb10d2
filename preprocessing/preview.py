"""The crop preview: the boxes the crop stage keeps, drawn on a few fields, to check the crop parameters on
one's own images before cropping a whole data set (``hamil crop-preview``).

Each field is shown brightened (scaled to its 99.5th percentile, as fluorescence fields are dark) with the
kept boxes (before square expansion) outlined in :data:`BOX_COLOUR`, titled with its name and box count.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from preprocessing.crop import (  # noqa: E402
    CropParams,
    crop_field,
    proposal_view,
    read_shard_field,
    resolve_roles,
)
from preprocessing.errors import InputError  # noqa: E402
from preprocessing.io import atomic_path, read_images_table  # noqa: E402
from preprocessing.microscopy import READ_JSON, ReadSpec, load_read_spec  # noqa: E402

BOX_COLOUR = (255, 255, 0)  # yellow
PANEL = 512  # px: longest side of a field in the figure
COLUMNS = 3


def preview_crop(
    fields: Sequence[str | os.PathLike[str]],
    params: CropParams,
    dest: str | os.PathLike[str],
    max_fields: int = 6,
) -> dict[str, int]:
    """Draw the kept boxes of the first ``max_fields`` fields on one figure, written (atomically) to
    ``dest`` as PNG; returns the number of boxes per field.

    ``fields`` are image files or ``images.tsv`` tables (``.tsv``: their rows, in order). An unreadable
    image or table is an :class:`InputError` naming it.
    """
    if max_fields < 1:
        raise InputError(f"max_fields must be >= 1; got {max_fields}")
    named = _field_paths(fields)[:max_fields]
    if not named:
        raise InputError("crop preview: no fields (the tables are empty)")
    panels, counts = [], {}
    for name, row, spec in named:
        field = read_shard_field(row, spec)  # (H, W, C), as the crop stage reads it
        roles = resolve_roles(params, spec)
        boxes = crop_field(field, roles)[0]  # (n, 4)
        counts[name] = len(boxes)
        shown = proposal_view(field, replace(roles, backend="opencv"))[0]  # (H, W, 3)
        panels.append((f"{name}: {len(boxes)} boxes", draw_boxes(shown, boxes)))
    _save_panels(panels, Path(dest), title=f"crop preview, backend {params.backend}")
    return counts


def draw_boxes(field: np.ndarray, boxes: np.ndarray, panel: int = PANEL) -> np.ndarray:
    """The field ``(H, W, 3)`` uint8, brightened and resized to longest side ``panel`` (never enlarged),
    with the outlines of ``boxes`` ``(n, 4)`` (x0, y0, x1, y1, field pixels) in :data:`BOX_COLOUR`, 2 px
    wide: ``(h, w, 3)`` uint8."""
    h, w = field.shape[:2]
    scale = min(1.0, panel / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(field, size, interpolation=cv2.INTER_AREA) if scale < 1 else field.copy()
    top = max(float(np.percentile(small, 99.5)), 1.0)
    out = np.clip(small.astype(np.float32) * (255.0 / top), 0, 255).astype(np.uint8)  # (h, w, 3)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale:
        corner0 = (int(round(x0)), int(round(y0)))
        corner1 = (max(int(round(x1)) - 1, corner0[0]), max(int(round(y1)) - 1, corner0[1]))
        cv2.rectangle(out, corner0, corner1, BOX_COLOUR, thickness=2)
    return out


def _field_paths(fields: Sequence[str | os.PathLike[str]]) -> list[tuple[str, dict, ReadSpec | None]]:
    """(name, row, read spec) of each field: image files as given (RGB), the rows of ``.tsv`` tables with
    the ``read.json`` beside them."""
    out = []
    for item in fields:
        path = Path(item)
        if path.suffix.lower() == ".tsv":
            spec = load_read_spec(path.parent / READ_JSON)
            out += [(str(r["image_id"]), r, spec) for r in read_images_table(path).to_dict("records")]
        else:
            out.append((path.name, {"path": str(path)}, None))
    return out


def _save_panels(panels: list[tuple[str, np.ndarray]], dest: Path, title: str) -> None:
    """One figure of the panels (title, image), ``COLUMNS`` a row, saved as PNG at ``dest``."""
    columns = min(COLUMNS, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 5.5 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (name, image) in zip(axes.ravel(), panels, strict=False):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(name, fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_path(dest) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
