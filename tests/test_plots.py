"""The figures a learner reads: the pages a search found, and score matrices with whole query labels."""

import matplotlib
import numpy as np
import torch
from PIL import Image

from colqwen3_lib.plots import plot_score_matrix, show_hits

matplotlib.use("Agg")


def _pages(n):
    return [Image.new("RGB", (40, 60), (10 * i, 100, 200)) for i in range(n)]


def test_show_hits_draws_the_pages_found_in_rank_order_with_page_and_score():
    pages = _pages(8)
    hits = [  # what MultiVectorIndex.search returns for one query, best first
        {"pdf": "report.pdf", "page": 7, "index": 6, "rank": 1, "score": 12.345},
        {"pdf": "report.pdf", "page": 2, "index": 1, "rank": 2, "score": 9.5},
        {"page": 4, "index": 3, "rank": 3, "score": 8.0},
    ]
    fig = show_hits(hits, pages, query="Which page shows the 2023 revenue?", columns=2, relevant={1})
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 3 and len(fig.axes) == 4  # two rows of two; the spare panel is blank
    labels = [ax.get_xlabel() for ax in axes]
    assert labels[0] == "#1  report.pdf p7\nscore 12.35"
    assert labels[1] == "#2  report.pdf p2\nscore 9.50  (relevant)" and labels[2].startswith("#3  p4\n")
    assert (np.asarray(axes[0].images[0].get_array()) == np.asarray(pages[6])).all()  # the hit's own page
    assert fig._suptitle.get_text().replace("\n", " ") == "Top 3 for: Which page shows the 2023 revenue?"


def test_a_long_query_wraps_instead_of_being_cut_off():
    query = "Where is the landscape page with the quarterly revenue bar chart drawn in dark green ink?"
    fig = show_hits([{"index": 0, "rank": 1, "score": 1.0}], _pages(1), query=query, columns=1)
    assert fig._suptitle.get_text().replace("\n", " ") == f"Top 1 for: {query}"
    fig = plot_score_matrix(torch.rand(1, 2), [f"q0: {query}"], ["p0", "p1"])
    assert fig.axes[0].get_yticklabels()[0].get_text().replace("\n", " ") == f"q0: {query}"
