"""Figures for the course: visual-token grids, score matrices, similarity maps, curves and bars.

Every function draws on a matplotlib Axes (a new figure when none is given) and returns the Figure,
with labelled axes, so the notebooks stay short and papermill runs still show the figures.
"""

from __future__ import annotations

import copy
import textwrap
from collections.abc import Collection, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image


def _axes(ax, figsize=(6, 4)):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def visual_token_grid(processor, image_size: tuple[int, int], max_num_visual_tokens: int | None = None):
    """(n_x, n_y, resized (width, height)) of the visual-token grid a page of PIL size gets under a cap."""
    if max_num_visual_tokens is not None:
        processor = copy.copy(processor)
        processor.image_processor = copy.deepcopy(processor.image_processor)
        processor.set_max_num_visual_tokens(max_num_visual_tokens)
    n_x, n_y = processor.get_n_patches(image_size, spatial_merge_size=processor.image_processor.merge_size)
    block = processor.block_size
    return n_x, n_y, (n_x * block, n_y * block)


def plot_token_grid(page: Image.Image, processor, max_num_visual_tokens: int | None = None, ax=None):
    """The page as the model sees it (resized), with one cell per visual token."""
    n_x, n_y, size = visual_token_grid(processor, page.size, max_num_visual_tokens)
    fig, ax = _axes(ax, figsize=(5, 5 * size[1] / size[0]))
    ax.imshow(page.convert("RGB").resize(size), extent=(0, size[0], size[1], 0))
    block = processor.block_size
    for x in range(0, size[0] + 1, block):  # magenta: no page draws its own lines in it
        ax.axvline(x, color="#d0179b", lw=0.8, alpha=0.8)
    for y in range(0, size[1] + 1, block):
        ax.axhline(y, color="#d0179b", lw=0.8, alpha=0.8)
    cap = processor.max_num_visual_tokens if max_num_visual_tokens is None else max_num_visual_tokens
    ax.set_title(
        f"{page.size[0]}x{page.size[1]} px page -> {size[0]}x{size[1]} px\n"
        f"{n_x} x {n_y} = {n_x * n_y} visual tokens (cap {cap})"
    )
    ax.set_xlabel("x (px, resized)")
    ax.set_ylabel("y (px, resized)")
    return fig


def plot_tokens_vs_cap(processor, page_sizes: Sequence[tuple[int, int]], caps: Sequence[int], ax=None):
    """Visual tokens per page as the cap grows, one line per page size."""
    fig, ax = _axes(ax)
    for size in page_sizes:
        counts = [np.prod(visual_token_grid(processor, size, cap)[:2]) for cap in caps]
        ax.plot(caps, counts, marker="o", label=f"{size[0]}x{size[1]} px")
    ax.plot(caps, caps, color="gray", ls="--", lw=1, label="cap")
    ax.set_xlabel("max_num_visual_tokens (cap)")
    ax.set_ylabel("visual tokens per page")
    ax.set_title("Visual tokens vs cap")
    ax.legend(fontsize=8)
    return fig


def plot_score_matrix(scores: torch.Tensor, query_labels: Sequence[str], page_labels: Sequence[str], ax=None):
    """Heatmap of MaxSim scores (queries x pages), best page per query marked; long query labels wrap."""
    scores = torch.as_tensor(scores).float()
    query_labels = [_wrapped(label, 40) for label in query_labels]
    fig, ax = _axes(ax, figsize=(1.2 + 0.45 * len(page_labels), 1.2 + 0.6 * len(query_labels)))
    image = ax.imshow(scores.numpy(), cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="MaxSim score")
    for row, col in enumerate(scores.argmax(dim=1).tolist()):
        ax.scatter(col, row, marker="*", color="white", s=60)
    ax.set_xticks(range(len(page_labels)), page_labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(query_labels)), query_labels, fontsize=7)
    ax.set_xlabel("page")
    ax.set_ylabel("query")
    ax.set_title("Query x page scores (* = best page)")
    return fig


def similarity_maps(
    query_emb: torch.Tensor, page_emb: torch.Tensor, image_mask: torch.Tensor, n_x: int, n_y: int
):
    """Per query token, its similarity to each visual token laid out on the page grid.

    Args:
        query_emb: (n_query_tokens, dim) embeddings of one query.
        page_emb: (seq_len, dim) embeddings of one processed page (padding included or not).
        image_mask: (seq_len,) True at the page's image tokens.
        n_x, n_y: The visual-token grid (`processor.get_n_patches`).

    Returns:
        (n_query_tokens, n_y, n_x) similarities.
    """
    image_tokens = page_emb[image_mask.bool()].float()  # (n_y * n_x, dim), row-major over the grid
    if image_tokens.shape[0] != n_x * n_y:
        raise ValueError(f"page has {image_tokens.shape[0]} image tokens, grid {n_x}x{n_y} needs {n_x * n_y}")
    sims = query_emb.float() @ image_tokens.T  # (n_query_tokens, n_y * n_x)
    return sims.view(-1, n_y, n_x)


def plot_similarity_map(page: Image.Image, sim_map: torch.Tensor, title: str = "", ax=None):
    """Overlay one query token's (n_y, n_x) similarity map on the page."""
    n_y, n_x = sim_map.shape
    fig, ax = _axes(ax, figsize=(4, 4 * page.height / page.width))
    ax.imshow(page.convert("RGB"), extent=(0, page.width, page.height, 0))
    overlay = ax.imshow(
        sim_map.numpy(),
        cmap="magma",
        alpha=0.55,
        extent=(0, page.width, page.height, 0),
        interpolation="nearest",
    )
    fig.colorbar(overlay, ax=ax, label="similarity", fraction=0.046)
    ax.set_title(title or f"{n_x} x {n_y} visual tokens")
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    return fig


def plot_loss(steps: Sequence[int], losses: Sequence[float], eval_steps=(), eval_losses=(), ax=None):
    """Training (and evaluation) loss per optimisation step."""
    fig, ax = _axes(ax)
    ax.plot(steps, losses, lw=1, label="train loss")
    if len(eval_steps):
        ax.plot(eval_steps, eval_losses, marker="o", label="eval loss")
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.legend()
    return fig


def plot_history(metrics: dict, ax=None):
    """`plot_loss` of a run's metrics (`TrainResult.metrics`, or a `metrics.json` read back)."""
    train, evals = metrics["train"], metrics.get("eval", [])
    return plot_loss(
        [e["step"] for e in train],
        [e["loss"] for e in train],
        [e["step"] for e in evals],
        [e["eval_loss"] for e in evals],
        ax=ax,
    )


class LiveLossCurve:
    """A loss curve redrawn in place while training runs: pass the instance as `train(..., on_log=curve)`.

    It redraws every `every` logged steps and at each evaluation (there is one at the end of a run), so
    the last figure shows the whole run.
    """

    def __init__(self, every: int = 25):
        from IPython.display import display

        self.every, self.log = every, []
        self.fig, self.ax = plt.subplots(figsize=(6, 3.5))
        self.handle = display(self.fig, display_id=True)
        plt.close(self.fig)

    def __call__(self, entry: dict) -> None:
        self.log.append(entry)
        if "eval_loss" in entry or entry["step"] % self.every == 0:
            self.ax.clear()
            train = [e for e in self.log if "loss" in e]
            plot_history({"train": train, "eval": [e for e in self.log if "eval_loss" in e]}, ax=self.ax)
            self.handle.update(self.fig)


def query_tokens(processor, batch, index: int) -> list[tuple[int, str]]:
    """(position, readable token) of each real token of query `index` in a processed query batch.

    Byte-level markers are removed (`'ĠPortrait'` reads `Portrait`), for titles and pickers.
    """
    ids = batch["input_ids"][index].tolist()
    mask = batch["attention_mask"][index].tolist()
    tokens = processor.tokenizer.convert_ids_to_tokens(ids)
    return [(i, tokens[i].replace("Ġ", " ").strip() or tokens[i]) for i in range(len(ids)) if mask[i]]


def plot_metric_bars(results: dict[str, dict[str, dict[str, float]]], metric: str = "ndcg_at_5", ax=None):
    """Grouped bars: `results[run][task][metric]` for each task, one bar per run (e.g. before/after)."""
    runs = list(results)
    tasks = sorted({task for run in runs for task in results[run]})
    fig, ax = _axes(ax, figsize=(max(5, 1.6 * len(tasks)), 4))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        values = [results[run].get(task, {}).get(metric, np.nan) for task in tasks]
        bars = ax.bar(np.arange(len(tasks)) + i * width, values, width, label=run)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(np.arange(len(tasks)) + width * (len(runs) - 1) / 2, tasks, rotation=15, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("task")
    ax.set_ylabel(metric.replace("_at_", "@").upper())
    ax.set_title(f"{metric.replace('_at_', '@').upper()} per task")
    ax.legend()
    return fig


def _wrapped(text: str, width: int) -> str:
    """Text broken into lines of at most `width` characters, never cut off."""
    return "\n".join(textwrap.wrap(text, width)) or text


def show_retrieved(
    query: str,
    pages: Sequence[Image.Image],
    scores: Sequence[float],
    relevant: Sequence[bool],
    labels: Sequence[str] | None = None,
    columns: int = 5,
):
    """The top pages for one query, in rank order with their scores; relevant pages framed in green.

    Args:
        query: The query, shown whole (wrapped) above the pages.
        pages: The pages found, best first.
        scores: Their MaxSim scores.
        relevant: Which of them are relevant (framed in green).
        labels: What to call each page (e.g. `report.pdf p12`); none by default.
        columns: Pages per row.
    """
    rows = -(-len(pages) // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(2.6 * columns, 3.4 * rows + 0.3), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[len(pages) :]:
        ax.axis("off")
    labels = labels or [""] * len(pages)
    for rank, (ax, page, score, hit, label) in enumerate(zip(axes.flat, pages, scores, relevant, labels), 1):
        ax.imshow(page.convert("RGB"))
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor("green" if hit else "lightgray")
            spine.set_linewidth(4 if hit else 1)
        text = f"#{rank}  {label}".rstrip() + f"\nscore {score:.2f}" + ("  (relevant)" if hit else "")
        ax.set_xlabel(text, fontsize=8)
    fig.suptitle(_wrapped(f"Top {len(pages)} for: {query}", 20 * columns), fontsize=10)
    return fig


def show_hits(
    hits: Sequence[dict],
    pages: Sequence[Image.Image],
    query: str | None = None,
    columns: int = 5,
    relevant: Collection[int] = (),
):
    """The pages `MultiVectorIndex.search` found for one query, as thumbnails with rank, page and score.

    Args:
        hits: One query's hits from `search` (each with `index`, `rank`, `score` and the page's metadata).
        pages: The page images, in the order they were added to the index (`hit["index"]` picks one).
        query: The query's text, for the title.
        columns: Thumbnails per row.
        relevant: Indices of pages known to answer the query, framed in green.

    Returns:
        The matplotlib figure (`fig.savefig("hits.png")` keeps it).
    """
    return show_retrieved(
        query or "the query",
        [pages[hit["index"]] for hit in hits],
        [hit["score"] for hit in hits],
        [hit["index"] in relevant for hit in hits],
        [_page_label(hit) for hit in hits],
        columns,
    )


def _page_label(hit: dict) -> str:
    """`report.pdf p12` from a hit's metadata (what of it there is), else its position in the index."""
    parts = [str(hit["pdf"])] if hit.get("pdf") else []
    if "page" in hit:
        parts.append(f"p{hit['page']}")
    return " ".join(parts) or f"page {hit['index']}"


def plot_memory_breakdown(estimates: dict[str, object], limit_gib: float | None = None, ax=None):
    """Stacked bars of `MemoryEstimate.breakdown()` per labelled configuration, with the GPU's memory."""
    parts = ("weights", "trainable", "gradients", "activations", "workspace")
    labels = list(estimates)
    fig, ax = _axes(ax, figsize=(max(5, 1.5 * len(labels)), 4))
    bottom = np.zeros(len(labels))
    for part in parts:
        values = np.array([estimates[label].breakdown()[part] for label in labels])
        ax.bar(labels, values, bottom=bottom, label="trainable + optimizer" if part == "trainable" else part)
        bottom += values
    for x, total in enumerate(bottom):  # each bar's total on top of it
        ax.annotate(f"{total:.1f}", (x, total), ha="center", va="bottom", fontsize=8)
    if limit_gib:
        ax.axhline(limit_gib, color="red", ls="--", lw=1, label=f"{limit_gib:.0f} GiB GPU")
    ax.set_ylabel("predicted peak memory (GiB)")
    ax.set_xlabel("configuration")
    ax.set_title("Where the memory goes")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=8)
    return fig


def plot_predicted_vs_measured(rows: Sequence[dict], tolerance: float = 0.25, ax=None):
    """Predicted against measured peak memory (MiB), with the +-tolerance band around y = x."""
    fig, ax = _axes(ax, figsize=(5, 5))
    measured = np.array([r["measured_mib"] for r in rows])
    predicted = np.array([r["predicted_mib"] for r in rows])
    top = max(measured.max(), predicted.max()) * 1.1
    line = np.array([0, top])
    ax.plot(line, line, color="gray", lw=1, label="prediction = measurement")
    ax.fill_between(
        line,
        line * (1 - tolerance),
        line * (1 + tolerance),
        color="gray",
        alpha=0.15,
        label=f"+-{tolerance:.0%}",
    )
    ax.scatter(measured, predicted, zorder=3)
    for r in rows:
        ax.annotate(
            r["label"],
            (r["measured_mib"], r["predicted_mib"]),
            fontsize=7,
            xytext=(4, -8),
            textcoords="offset points",
        )
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("measured peak (MiB)")
    ax.set_ylabel("predicted peak (MiB)")
    ax.set_title("Memory estimator vs measurement")
    ax.legend(fontsize=8, loc="upper left")
    return fig


def plot_memory_grid(
    batch_sizes: Sequence[int], visual_tokens: Sequence[int], totals_gib, limit_gib: float, ax=None
):
    """Predicted peak memory against batch size, one line per visual-token cap, with the GPU's memory."""
    fig, ax = _axes(ax)
    for tokens, row in zip(visual_tokens, totals_gib):
        ax.plot(batch_sizes, row, marker="o", label=f"{tokens} visual tokens")
    ax.axhline(limit_gib, color="red", ls="--", lw=1, label=f"{limit_gib:.0f} GiB GPU")
    ax.set_xticks(
        batch_sizes, [str(b) for b in batch_sizes]
    )  # a linear axis: memory grows linearly with both
    ax.set_xlabel("per-device batch size")
    ax.set_ylabel("predicted peak memory (GiB)")
    ax.set_title("Batch size x visual tokens")
    ax.legend(fontsize=8)
    return fig
