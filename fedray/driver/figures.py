"""Heatmaps a method offers at the end of a run (``Method.heatmaps``), drawn as PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedray.methods import Heatmap

#: Sequential colour map: high values (e.g. aligned modules) show bright, as in the papers' figures.
COLOUR_MAP = "viridis"
#: Colour of undefined (NaN) cells; viridis has no white.
MISSING_COLOUR = "white"
#: Size of the figure in inches.
FIGURE_SIZE_IN = (6.0, 5.0)
#: Resolution of the saved PNG.
FIGURE_DPI = 120


def draw_heatmap(heatmap: Heatmap, out_png: Path) -> None:
    """Draw ``heatmap`` to ``out_png``, undefined cells left white."""
    # A bare Figure renders with Agg and leaves pyplot's global state (and backend) alone.
    figure = Figure(figsize=FIGURE_SIZE_IN)
    axes = figure.add_subplot()
    low, high = heatmap.value_range
    image = axes.imshow(
        np.ma.masked_invalid(heatmap.values.numpy()), cmap=_colour_map(), vmin=low, vmax=high, origin="upper"
    )
    figure.colorbar(image, ax=axes, label=heatmap.value_label)
    axes.set_xlabel(heatmap.xlabel)
    axes.set_ylabel(heatmap.ylabel)
    axes.set_title(heatmap.title)
    for axis in (axes.xaxis, axes.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    if heatmap.caption:
        figure.text(0.5, 0.0, heatmap.caption, ha="center", va="top", fontsize="small")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, dpi=FIGURE_DPI, bbox_inches="tight")


def _colour_map() -> Colormap:
    return colormaps[COLOUR_MAP].with_extremes(bad=MISSING_COLOUR)
