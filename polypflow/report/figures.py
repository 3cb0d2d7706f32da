"""The report's figures (matplotlib, Agg, PNG bytes): the summary chart, curves, distributions, CV, thumbnails."""

from __future__ import annotations

import io
from collections.abc import Iterable

import matplotlib

matplotlib.use("Agg")  # figures to PNG bytes, never a window: before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from polypflow.evaluate.seg_metrics import MODEL_DICE  # noqa: E402
from polypflow.evaluate.stats import bootstrap_ci  # noqa: E402
from polypflow.report.load import MethodResults  # noqa: E402


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _axes(n: int, width: float = 4.0, height: float = 3.4, stacked: bool = False):
    """``n`` panels side by side (or one above the other when ``stacked``)."""
    matplotlib.use("Agg")
    rows, cols = (n, 1) if stacked else (1, n)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, list(axes.flat)


def line_styles(methods: list[MethodResults]) -> dict[str, dict]:
    """A distinct colour and dash per method, stable across figures (20 colours, then dashed, then dotted);
    published methods' maps in black."""
    colours = matplotlib.colormaps["tab20"].colors
    dashes = ["-", "--", ":", "-."]
    ours = [m for m in methods if not m.external]
    styles = {m.name: {"color": colours[i % len(colours)], "ls": dashes[i // len(colours) % len(dashes)]}
              for i, m in enumerate(ours)}
    return {**styles, **{m.name: {"color": "black", "ls": dashes[i % len(dashes)]}  # published maps: black
                         for i, m in enumerate(m for m in methods if m.external)}}


def m_protocol(methods: list[MethodResults], dataset: str) -> str:
    return next((m.summary[dataset].get("protocol", "?") for m in methods if dataset in m.summary), "?")


def datasets_of(methods: list[MethodResults]) -> list[str]:
    return sorted({d for m in methods for d in m.summary}, key=lambda d: (m_protocol(methods, d) == "unseen", d))


def summary_figure(methods: list[MethodResults], n_boot: int, seed: int, confidence: float,
                   paper_lines: dict[str, float] | None = None) -> bytes:
    """One compact chart: per test set, each method's mDice (at its threshold) with its bootstrap interval;
    published methods' maps in black; ``paper_lines`` (dataset -> value) drawn as a dashed reference."""
    datasets = datasets_of(methods)
    fig, axes = _axes(len(datasets), width=3.3, height=0.6 + 0.28 * len(methods))
    order = sorted(methods, key=lambda m: (m.external, m.name))
    lows, highs = [], []
    for col, (ax, dataset) in enumerate(zip(axes, datasets, strict=True)):
        for row, m in enumerate(order):
            dice = m.per_image.loc[m.per_image["dataset"] == dataset, MODEL_DICE].to_numpy() if len(m.per_image) else []
            if len(dice):
                ci = bootstrap_ci(dice, n_boot, seed, confidence)
                colour = "black" if m.external else "tab:blue"
                ax.errorbar(ci.mean, row, xerr=[[ci.mean - ci.low], [ci.high - ci.mean]], fmt="o", ms=4,
                            color=colour, ecolor=colour, capsize=2, lw=1)
                lows.append(ci.low)
                highs.append(ci.high)
        if paper_lines and dataset in paper_lines:
            ax.axvline(paper_lines[dataset], color="tab:red", ls="--", lw=1)
        ax.set_yticks(range(len(order)), [m.label for m in order] if col == 0 else [""] * len(order), fontsize=8)
        ax.set_ylim(len(order) - 0.5, -0.5)
        ax.set(title=f"{dataset} ({m_protocol(methods, dataset)})", xlabel="mDice")
        ax.grid(alpha=0.3, axis="x")
    if lows:  # one x range for every panel, fitted to the intervals (a 0..1 axis squashes them)
        for ax in axes:
            ax.set_xlim(max(0.0, min(lows) - 0.03), min(1.0, max(highs) + 0.03))
    return png(fig)


def curve_figure(methods: list[MethodResults], table: str, x: str, y: str, xlabel: str, ylabel: str,
                 mark: bool = False) -> bytes:
    """One panel per test set, one line per method, from each method's ``pr``/``sweep`` table; ``mark``
    draws each method's own threshold as a dotted line."""
    datasets, styles = datasets_of(methods), line_styles(methods)
    fig, axes = _axes(len(datasets))
    for ax, dataset in zip(axes, datasets, strict=True):
        for m in methods:
            frame = getattr(m, table)
            part = frame[frame["dataset"] == dataset] if len(frame) else frame
            if len(part):
                ax.plot(part[x], part[y], marker="o", markersize=3, lw=1.2, label=m.label, **styles[m.name])
            if mark and dataset in m.summary:
                ax.axvline(m.threshold, color=styles[m.name]["color"], lw=0.8, ls=":")
        ax.set(title=f"{dataset} ({m_protocol(methods, dataset)})", xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if len(methods) <= 6:
        axes[-1].legend(handles, labels, fontsize=8)
    else:  # one legend for all panels, beside them
        fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5),
                   ncol=1 + len(methods) // 16)
    return png(fig)


def training_figure(methods: list[MethodResults]) -> bytes:
    """Validation Dice (at 0.5; dotted at the grid's best threshold where searched; dashed the raw weights' where
    the shipped ones are their moving average) and training loss per epoch; the selected epoch marked: the curves `dvc plots show` draws from history.csv, without a CDN."""
    trained = [m for m in methods if len(m.history)]
    styles = line_styles(methods)
    fig, (dice_ax, loss_ax) = _axes(2, width=5.0)
    for m in trained:
        h = m.history
        dice_ax.plot(h["epoch"], h["val_dice"], marker="o", markersize=3, lw=1.2, label=m.label, **styles[m.name])
        if "val_dice_tuned" in h and h["val_dice_tuned"].notna().any():
            dice_ax.plot(h["epoch"], h["val_dice_tuned"], lw=0.8, color=styles[m.name]["color"], ls=":")
        if "val_dice_raw" in h and h["val_dice_raw"].notna().any():
            dice_ax.plot(h["epoch"], h["val_dice_raw"], lw=0.8, color=styles[m.name]["color"], ls="--")
        if m.train.get("best_epoch"):
            best = h[h["epoch"] == m.train["best_epoch"]]
            dice_ax.scatter(best["epoch"], best["val_dice"], s=60, facecolors="none", edgecolors=styles[m.name]["color"])
        loss_ax.plot(h["epoch"], h["train_loss"], lw=1.2, label=m.label, **styles[m.name])
    dice_ax.set(xlabel="epoch", ylabel="validation Dice",
                title="Validation Dice (circle: selected epoch; dashed: raw weights beside their EMA)")
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="Training loss", yscale="log")
    for ax in (dice_ax, loss_ax):
        ax.grid(alpha=0.3)
    if trained:
        fig.legend(*dice_ax.get_legend_handles_labels(), fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5),
                   ncol=1 + len(trained) // 16)
    return png(fig)


def distribution_figure(methods: list[MethodResults]) -> bytes:
    """Per-image Dice at each method's threshold: a box per method in each test set, the images as dots."""
    datasets = datasets_of(methods)
    many = len(methods) > 4  # then one panel per row, wide enough for every method's box
    fig, axes = _axes(len(datasets), width=max(3.0, (0.5 if many else 1.2) * len(methods) + 1.5), stacked=many)
    rng = np.random.default_rng(0)
    for ax, dataset in zip(axes, datasets, strict=True):
        values = [m.per_image.loc[m.per_image["dataset"] == dataset, MODEL_DICE].to_numpy() for m in methods]
        ax.boxplot(values, showmeans=True, widths=0.5)
        ax.set_xticks(range(1, len(methods) + 1), [m.label for m in methods], rotation=60 if many else 20,
                      ha="right" if many else "center")
        for i, v in enumerate(values, 1):
            ax.scatter(i + rng.uniform(-0.18, 0.18, len(v)), v, s=5, alpha=0.35, color="tab:blue")
        ax.set(title=f"{dataset} ({m_protocol(methods, dataset)})", ylabel="Dice per image", ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3, axis="y")
    return png(fig)


def pareto_figure(points: pd.DataFrame, published: pd.DataFrame, xlabel: str) -> bytes:
    """Accuracy against speed: our points (``pareto_points``: colour per method, circle fp32, square int8, hollow for
    a TTA model's plain network) with their Pareto front as a step line; published points as grey stars, published
    maps without an FPS of ours as dotted horizontal lines."""
    fig, (ax,) = _axes(1, width=7.0, height=4.4)
    colours = matplotlib.colormaps["tab10"].colors
    for i, (method, part) in enumerate(points.groupby("method", sort=False)):
        colour = colours[i % len(colours)]
        for (graph, precision), row in part.groupby(["graph", "precision"], sort=False):
            ax.scatter(row["FPS"], row["mean Dice"], marker="o" if precision == "fp32" else "s", s=40,
                       edgecolors=colour, facecolors="none" if graph == "plain" else colour,
                       label=f"{method} {precision}" + (" (plain network, no TTA)" if graph == "plain" else ""))
    front = points[points["front"] == "yes"].sort_values("FPS")
    if len(front):
        ax.step(front["FPS"], front["mean Dice"], where="post", color="grey", ls="--", lw=1, label="Pareto front (ours)")
    for _, ref in published.iterrows():
        if np.isnan(ref["FPS"]):
            ax.axhline(ref["mean Dice"], color="black", ls=":", lw=1, label=ref["label"])
        else:
            ax.scatter(ref["FPS"], ref["mean Dice"], marker="*", s=110, color="grey", label=ref["label"])
    ax.set(xlabel=xlabel, ylabel="mean Dice over test sets")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    return png(fig)


def cv_figure(crossval: dict) -> bytes:
    fig, (ax,) = _axes(1, width=4.5)
    folds = crossval["folds"]
    ax.bar(range(len(folds)), folds, color="tab:blue", alpha=0.7)
    ax.axhline(crossval["dice_mean"], color="black", lw=1, label=f"mean {crossval['dice_mean']:.3f}")
    ax.axhspan(crossval["dice_mean"] - crossval["dice_std"], crossval["dice_mean"] + crossval["dice_std"],
               color="grey", alpha=0.2, label=f"± std {crossval['dice_std']:.3f}")
    ax.set(xlabel="fold", ylabel="held-out Dice", title=f"{crossval['method']}: {crossval['k']}-fold CV",
           xticks=range(len(folds)), ylim=(0, 1))
    ax.legend(fontsize=8)
    return png(fig)


def thumbnail_pair(paths: Iterable[str], height: int = 160) -> bytes:
    images = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            images.append(image.resize((round(image.width * height / image.height), height)))
    canvas = Image.new("RGB", (sum(i.width for i in images) + 8 * (len(images) - 1), height), "white")
    x = 0
    for image in images:
        canvas.paste(image, (x, 0))
        x += image.width + 8
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
