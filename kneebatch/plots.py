"""Figures for a cohort (matplotlib Figure objects, no pyplot: no display, no global state): measurements by group, along a
grade, over time, a study's orthogonal slices with its label overlay and its cartilage thickness maps. Each figure is
written as PNG and SVG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure  # figures without pyplot: no backend chosen, no global state
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from kneebatch import labels as L  # noqa: E402

PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]


def nice_name(column: str) -> str:
    """``effusion_volume_ml`` -> ``effusion volume (mL)``."""
    for suffix, unit in (("_volume_ml", " volume (mL)"), ("_volume_mm3", " volume (mm³)"),
                         ("_thickness_mean_mm", " thickness (mm)"), ("_thickness_p95_mm", " thickness p95 (mm)")):
        if column.endswith(suffix):
            return column[: -len(suffix)].replace("_", " ") + unit
    return column.replace("_", " ")


def save(fig, folder: Path, name: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.svg"]
    fig.savefig(paths[0], dpi=110, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    return paths


def _panels(n: int, width: float = 3.2, height: float = 3.0):
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = Figure(figsize=(width * cols, height * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()[:n]


def by_group(df: pd.DataFrame, by: str, measures: list[str], order: list) -> Figure:
    """Box plots with every study as a jittered point, one panel per measurement."""
    rng = np.random.default_rng(0)
    fig, axes = _panels(len(measures))
    for ax, col in zip(axes, measures):
        data = [pd.to_numeric(df.loc[df[by] == g, col], errors="coerce").dropna().to_numpy() for g in order]
        ax.boxplot(data, showfliers=False, widths=0.55, medianprops={"color": "black"})
        for i, v in enumerate(data):
            ax.scatter(i + 1 + rng.uniform(-0.15, 0.15, v.size), v, s=14, alpha=0.75, color=PALETTE[i % len(PALETTE)],
                       zorder=3)
        ax.set_xticks(range(1, len(order) + 1), [f"{g}\n(n={len(v)})" for g, v in zip(order, data)])
        ax.set_title(nice_name(col), fontsize=9)
    fig.tight_layout()
    return fig


def along_grade(df: pd.DataFrame, grade: str, measures: list[str]) -> Figure:
    """Each study against an ordinal grade (e.g. KL), with the mean per grade."""
    rng = np.random.default_rng(1)
    fig, axes = _panels(len(measures))
    for ax, col in zip(axes, measures):
        data = pd.DataFrame({"x": pd.to_numeric(df[grade], errors="coerce"),
                             "y": pd.to_numeric(df[col], errors="coerce")}).dropna()
        ax.scatter(data["x"] + rng.uniform(-0.12, 0.12, len(data)), data["y"], s=14, alpha=0.7, color=PALETTE[0])
        means = data.groupby("x")["y"].mean()
        ax.plot(means.index, means.to_numpy(), "-o", color="black", lw=1.5, ms=4)
        ax.set_xlabel(grade.replace("_", " "))
        ax.set_title(nice_name(col), fontsize=9)
    fig.tight_layout()
    return fig


def trajectories(df: pd.DataFrame, by: str, measures: list[str], order: list) -> Figure:
    """Each subject's measurement over the years since its first visit, coloured by group."""
    fig, axes = _panels(len(measures))
    colour = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(order)}
    for ax, col in zip(axes, measures):
        for _, g in df.dropna(subset=["subject_key", "visit_days"]).groupby("subject_key"):
            g = g.sort_values("visit_days")
            ax.plot(g["visit_days"] / 365.25, pd.to_numeric(g[col], errors="coerce"), "-o", ms=3, lw=1, alpha=0.8,
                    color=colour.get(g[by].iloc[0], "grey") if by in g else "grey")
        ax.set_xlabel("years since first visit")
        ax.set_title(nice_name(col), fontsize=9)
    handles = [Line2D([], [], color=c, marker="o", label=str(g)) for g, c in colour.items()]
    axes[0].legend(handles=handles, fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- a study's slices
def _colour_table() -> np.ndarray:
    table = np.zeros((L.N_CLASSES, 4))
    for label in L.LABELS:
        table[label.id, :3] = [int(label.color[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        table[label.id, 3] = OVERLAY_OPACITY
    return table


OVERLAY_OPACITY = 0.4  # the image stays readable under the labels


def edges(labels: np.ndarray) -> np.ndarray:
    """Pixels with a differently labelled 4-neighbour."""
    edge = np.zeros(labels.shape, bool)
    for axis in (0, 1):
        lo = [slice(None)] * 2
        hi = [slice(None)] * 2
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        step = labels[tuple(lo)] != labels[tuple(hi)]
        edge[tuple(lo)] |= step
        edge[tuple(hi)] |= step
    return edge


def region_borders(region: np.ndarray, pixel) -> list:
    """Line segments (in the map's mm, ``region[row, col]`` at ``(col, row) * pixel``) along the
    pixel edges where two different regions meet (``-1``, off the plate, borders nothing)."""
    px, py = pixel
    segments = []
    rows, cols = np.nonzero((region[:, :-1] != region[:, 1:]) & (region[:, :-1] >= 0) & (region[:, 1:] >= 0))
    segments += [[((c + 1) * px, r * py), ((c + 1) * px, (r + 1) * py)] for r, c in zip(rows, cols)]
    rows, cols = np.nonzero((region[:-1] != region[1:]) & (region[:-1] >= 0) & (region[1:] >= 0))
    segments += [[(c * px, (r + 1) * py), ((c + 1) * px, (r + 1) * py)] for r, c in zip(rows, cols)]
    return segments


def outlines(labels: np.ndarray) -> np.ndarray:
    """``labels`` kept only on each region's edge (a pixel with a differently labelled
    4-neighbour), 0 elsewhere: the image stays visible inside every tissue."""
    return np.where(edges(labels), labels, 0)


def slices_figure(image: np.ndarray, labels: np.ndarray, spacing_zyx, title: str = "",
                  outline: bool = False) -> Figure:
    """Sagittal, coronal and axial slices through the labelled knee's centre, the label map
    over the image, at the true aspect ratio (the store's axes: z right, y inferior, x
    posterior). ``outline``: each tissue's edge, opaque, instead of a 40 % fill."""
    fg = np.argwhere(labels > 0)
    centre = fg.mean(0).round().astype(int) if fg.size else np.array(labels.shape) // 2
    lo, hi = np.percentile(image, [1, 99.5]) if image.size else (0, 1)
    colours = _colour_table()
    if outline:
        colours[1:, 3] = 1.0
    sz, sy, sx = map(float, spacing_zyx)
    views = [("sagittal", image[centre[0]], labels[centre[0]], sy / sx),
             ("coronal", image[:, :, centre[2]].T, labels[:, :, centre[2]].T, sy / sz),
             ("axial", image[:, centre[1], :], labels[:, centre[1], :], sz / sx)]
    fig = Figure(figsize=(10.5, 3.8))
    axes = fig.subplots(1, 3)
    for ax, (name, img, lab, aspect) in zip(axes, views):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        ax.imshow(colours[outlines(lab) if outline else lab], aspect=aspect, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    shown = sorted({int(v) for _, _, lab, _ in views for v in np.unique(lab)} - {L.BACKGROUND})
    fig.tight_layout(rect=(0, 0.12 if shown else 0, 1, 1))
    if shown:  # the legend: every tissue these slices show, in its colour
        handles = [Patch(facecolor=colours[i][:3], label=L.by_id(i).name.replace("_", " ")) for i in shown]
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7, frameon=False)
    return fig


def study_slices(store, key: str, label_name: str | None = None, what: str | None = None,
                 outline: bool = False) -> Figure:
    """:func:`slices_figure` of a study in the store (the first channel, its segmentation or
    ``label_name``); ``what``: a human name for the label map in the title (an engine set's)."""
    name, labels = store.chosen_labels(key, label_name)
    if labels is None:
        raise ValueError(f"study {key} has no label map{f' named {name}' if name else ''}")
    image, grid = store.read_image(key, [0])
    title = f"{key} · {what or name} · {store.channels(key)[0]}"
    return slices_figure(image[0], labels, grid.spacing, title, outline)


THICKNESS_RANGE_MM = (0.0, 4.0)  # colour scale of the maps: cartilage is 1-4 mm thick


def thickness_maps_figure(maps: dict, title: str = "") -> Figure:
    """The tibial plates seen from above and the femoral cartilage unrolled (trochlea at the top),
    thickness in colour, denuded bone in red, each Wirth & Eckstein region outlined and named
    (the weight-bearing femur in its thirds);
    lateral to the left and medial to the right whichever the knee."""
    from matplotlib import colormaps

    from kneebatch.cartilage_regions import REGIONS

    fig = Figure(figsize=(10.5, 4.2))
    axes = fig.subplots(1, 2)
    cmap = colormaps["viridis"].with_extremes(under="#d62728", bad="white")
    image = None
    for ax, part, ylabel in ((axes[0], "tibia", "posterior  ←  (mm)  →  anterior"),
                             (axes[1], "femur", "posterior  ←  angle about the condyles  →  trochlea")):
        tmap = maps.get(part)
        ax.set_title(f"{part}: thickness (mm)", fontsize=9)
        if tmap is None:
            ax.text(0.5, 0.5, "no plates", ha="center", va="center", transform=ax.transAxes)
            ax.axis("off")
            continue
        # rows of the map are the medial axis; show it across, the second axis upwards
        # (the femur's angle grows from the trochlea to the back: flipped so the trochlea is on top)
        shown = np.where(tmap.thickness == 0, -1.0, tmap.thickness).T
        region = tmap.finest().T
        if part == "femur":
            shown, region = shown[::-1], region[::-1]
        extent = (0, shown.shape[1] * tmap.pixel[0], 0, shown.shape[0] * tmap.pixel[1])
        image = ax.imshow(shown, origin="lower", cmap=cmap, vmin=1e-6, vmax=THICKNESS_RANGE_MM[1],
                          extent=extent, aspect="auto" if part == "femur" else "equal", interpolation="nearest")
        # the borders between regions, on the pixels' edges: every pixel keeps its colour
        ax.add_collection(LineCollection(region_borders(region, tmap.pixel), colors="black", linewidths=0.8))
        for index in np.unique(region[region >= 0]):
            rows, cols = np.nonzero(region == index)
            ax.text((cols.mean() + 0.5) * tmap.pixel[0], (rows.mean() + 0.5) * tmap.pixel[1], REGIONS[index],
                    ha="center", va="center", fontsize=7, color="white")
        ax.set_xlabel("lateral  ←  (mm)  →  medial", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        if part == "femur":
            ax.set_yticks([])
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes), shrink=0.8, extend="min")
        bar.set_label("thickness (mm); red: denuded", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def study_thickness_maps(store, key: str, label_name: str | None = None, what: str | None = None) -> Figure:
    """:func:`thickness_maps_figure` of a study's label map in the store."""
    from kneebatch.cartilage_regions import regional_cartilage
    from kneebatch.measure import knee_crop

    name, labels = store.chosen_labels(key, label_name)
    if labels is None:
        raise ValueError(f"study {key} has no label map{f' named {name}' if name else ''}")
    _, grid = store.read_image(key, [0])
    host, crop = knee_crop(labels, grid)
    maps = {} if host is None else regional_cartilage(host, crop).maps
    return thickness_maps_figure(maps, f"{key} · {what or name} · cartilage thickness")


def qc_images(store_path, out, label_name: str | None = None, show_progress=None,
              per_study: dict | None = None, outline: bool = False) -> tuple[int, list[str], dict]:
    """``kneebatch qc``: ``OUT/<key>.png`` (slices with the label overlay) and
    ``OUT/<key>_thickness.png`` (the cartilage thickness maps with their subregions) for every
    study of the store with a label map (``per_study``'s for the study: the maps a run wrote; else
    ``label_name``; else its newest segmentation). Returns (written, keys without one, how many
    studies each label map drew: what the images show)."""
    from kneebatch.ingest.store import CohortStore
    from kneebatch.outputs import claim_output_dir
    from kneebatch.progress import progress_bar

    store = CohortStore(store_path, create=False)
    out = claim_output_dir(out, "qc", {})
    written, missing, drawn = 0, [], {}
    keys = store.study_keys()
    with progress_bar(len(keys), "drawing QC slices", show_progress) as advance:
        for key in keys:
            name = per_study.get(key) if per_study is not None else label_name or store.segmentation(key)
            if name is None or name not in store.label_names(key):
                missing.append(key)
            else:
                title = store.label_title(key, name)
                study_slices(store, key, name, title, outline).savefig(out / f"{key}.png", dpi=100,
                                                                       bbox_inches="tight")
                study_thickness_maps(store, key, name, title).savefig(out / f"{key}_thickness.png", dpi=100,
                                                                      bbox_inches="tight")
                drawn[title] = drawn.get(title, 0) + 1
                written += 1
            advance()
    return written, missing, drawn
