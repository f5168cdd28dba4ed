"""The multi-vector index: what is saved loads back bit for bit, and search is MaxSim over the pages."""

import json

import pytest
import torch
import torch.nn.functional as F

from colqwen3_lib.scoring import score_multi_vector
from colqwen3_lib.search import PAGES_FILE, VECTORS_FILE, MultiVectorIndex


def _pages(lengths, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, dim, generator=generator), dim=-1) for n in lengths]


@pytest.fixture
def index():
    index = MultiVectorIndex(info={"model": "test"})
    index.add(_pages([5, 9, 3]), [{"pdf": "a.pdf", "page": p} for p in (1, 2, 3)])
    index.add(_pages([7, 4], seed=1), [{"pdf": "b.pdf", "page": p} for p in (1, 2)])
    return index


def test_pages_lie_end_to_end(index):
    assert len(index) == 5 and index.dim == 16
    assert index.offsets.tolist() == [0, 5, 14, 17, 24, 28]
    assert index.vectors.shape == (28, 16) and index.vectors.dtype == torch.float16
    assert index.nbytes == 28 * 16 * 2
    assert [e.shape[0] for e in index.page_embeddings()] == [5, 9, 3, 7, 4]


def test_save_and_load_round_trip_is_exact(index, tmp_path):
    index.save(tmp_path / "index")
    loaded = MultiVectorIndex.load(tmp_path / "index")
    assert torch.equal(loaded.vectors, index.vectors) and loaded.vectors.dtype == index.vectors.dtype
    assert torch.equal(loaded.offsets, index.offsets)
    assert loaded.pages == index.pages and loaded.info == index.info and loaded.dim == index.dim
    queries = _pages([3, 6], seed=2)
    assert torch.equal(loaded.scores(queries), index.scores(queries))


def test_a_loaded_index_takes_more_pages(index, tmp_path):
    loaded = MultiVectorIndex.load(index.save(tmp_path / "index"))
    loaded.add(_pages([2], seed=3), [{"pdf": "c.pdf", "page": 1}])
    assert len(loaded) == 6 and loaded.offsets.tolist()[-1] == 30 and loaded.vectors.shape == (30, 16)


def test_scores_equal_score_multi_vector_on_the_stored_vectors(index):
    queries = _pages([4, 6, 2], seed=4)
    expected = score_multi_vector(queries, [p.float() for p in index.page_embeddings()])
    torch.testing.assert_close(index.scores(queries), expected)
    float32 = MultiVectorIndex(dtype=torch.float32)
    pages = _pages([5, 9, 3])
    float32.add(pages)
    torch.testing.assert_close(float32.scores(queries), score_multi_vector(queries, pages))


def test_search_returns_the_best_pages_in_order_with_their_metadata(index):
    queries = _pages([4, 6], seed=5)
    scores = index.scores(queries)
    hits = index.search(queries, k=3)
    for row, query_hits in zip(scores, hits):
        assert [h["index"] for h in query_hits] == row.argsort(descending=True)[:3].tolist()
        assert [h["rank"] for h in query_hits] == [1, 2, 3]
        assert [h["score"] for h in query_hits] == pytest.approx(sorted(row.tolist(), reverse=True)[:3])
        assert all(h["pdf"] == index.pages[h["index"]]["pdf"] for h in query_hits)
    assert len(index.search(queries, k=50)[0]) == 5  # k beyond the index: every page


def test_a_page_found_by_its_own_tokens_comes_first(index):
    pages = index.page_embeddings()
    hits = index.search([pages[3].float()[:2]], k=1)
    assert hits[0][0]["index"] == 3 and hits[0][0]["page"] == 1 and hits[0][0]["pdf"] == "b.pdf"


def test_empty_index_says_so():
    index = MultiVectorIndex()
    with pytest.raises(ValueError, match="the index is empty"):
        index.search(_pages([3]))
    with pytest.raises(ValueError, match="the index is empty"):
        index.save("unused")


def test_bad_additions_are_refused(index):
    with pytest.raises(ValueError, match="page 0 has dim 8, the index holds dim 16"):
        index.add([torch.zeros(3, 8)])
    with pytest.raises(ValueError, match="2 pages of embeddings but 1 metadata records"):
        index.add(_pages([2, 2]), [{}])
    with pytest.raises(ValueError, match=r"page 1: expected \(n_tokens, dim\)"):
        index.add([torch.zeros(2, 16), torch.zeros(0, 16)])
    with pytest.raises(ValueError, match="JSON-serialisable"):
        index.add(_pages([2]), [{"image": object()}])
    assert len(index) == 5  # nothing was half-added


def test_query_of_another_dim_is_refused(index):
    with pytest.raises(ValueError, match="query dim 8 != page dim 16"):
        index.search([torch.zeros(3, 8)])


def test_missing_or_damaged_index_is_refused(index, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a saved index"):
        MultiVectorIndex.load(tmp_path / "nothing")
    path = index.save(tmp_path / "index")
    record = json.loads((path / PAGES_FILE).read_text())
    record["pages"] = record["pages"][:-1]
    (path / PAGES_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="disagree"):
        MultiVectorIndex.load(path)
    (path / PAGES_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="could not be read as an index"):
        MultiVectorIndex.load(path)
    (path / PAGES_FILE).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="is not a colqwen3-multi-vector-index file"):
        MultiVectorIndex.load(path)
    index.save(path)
    (path / VECTORS_FILE).write_bytes(b"truncated")
    with pytest.raises(ValueError, match="could not be read as an index"):
        MultiVectorIndex.load(path)
