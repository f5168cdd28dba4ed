"""The multi-vector index: what is saved loads back bit for bit, and search is MaxSim over the pages."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from colqwen3_lib import search
from colqwen3_lib.scoring import score_multi_vector
from colqwen3_lib.search import PAGES_FILE, MultiVectorIndex


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
    vectors = _vectors_file(path)
    vectors.write_bytes(b"truncated")
    with pytest.raises(ValueError, match="is not the file index.json was saved with"):
        MultiVectorIndex.load(path)
    vectors.unlink()
    with pytest.raises(FileNotFoundError, match="lacks its vectors"):
        MultiVectorIndex.load(path)


def _vectors_file(folder):
    (vectors,) = folder.glob("vectors-*.safetensors")
    return vectors


def _other_index():
    other = MultiVectorIndex()
    other.add(_pages([5, 9, 3], seed=7), [{"pdf": "new.pdf", "page": p} for p in (1, 2, 3)])
    return other


@pytest.mark.parametrize("crash_at", ["writing the vectors", "before index.json", "removing the old vectors"])
def test_a_save_that_dies_leaves_the_old_index_or_the_new_one_whole(index, tmp_path, monkeypatch, crash_at):
    """Saving over an index with the same number of vectors: a crash never pairs old records with new vectors."""
    path = index.save(tmp_path / "index")
    (path / "notes.txt").write_text("mine")
    other = _other_index()
    targets = {
        "writing the vectors": (search, "save_file"),
        "before index.json": (search, "write_json"),
        "removing the old vectors": (search, "_remove_other_vectors"),
    }
    owner, name = targets[crash_at]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(owner, name, crash)
    with pytest.raises(KeyboardInterrupt):
        other.save(path)
    monkeypatch.undo()
    loaded = MultiVectorIndex.load(path)
    expected = other if crash_at == "removing the old vectors" else index
    assert loaded.pages == expected.pages and torch.equal(loaded.vectors, expected.vectors)
    assert (path / "notes.txt").read_text() == "mine"
    other.save(path)  # the next save tidies up: one vectors file, no temporary files
    assert len(list(path.glob("vectors-*.safetensors"))) == 1 and not list(path.glob(".*"))
    umask = os.umask(0)
    os.umask(umask)
    for file in (path / PAGES_FILE, _vectors_file(path)):  # readable by others, as files written plainly are
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask


def test_an_index_saved_by_version_1_still_loads(index, tmp_path):
    path = index.save(tmp_path / "index")
    _vectors_file(path).rename(path / "vectors.safetensors")
    record = json.loads((path / PAGES_FILE).read_text())
    for key in ("vectors_file", "vectors_sha256"):
        del record[key]
    (path / PAGES_FILE).write_text(json.dumps({**record, "version": 1}))
    loaded = MultiVectorIndex.load(path)
    assert loaded.pages == index.pages and torch.equal(loaded.vectors, index.vectors)
    index.save(path)  # saving over it replaces the version 1 vectors file
    assert not (path / "vectors.safetensors").exists()


def test_search_results_keep_their_own_fields(index, tmp_path):
    """Metadata may not use the names of the result's fields: refused when added, and in a hand-edited file."""
    with pytest.raises(
        ValueError, match=r"\['rank', 'score'\], which search results use for their own fields"
    ):
        index.add(_pages([3]), [{"score": 99.0, "rank": 7}])
    assert len(index) == 5
    path = index.save(tmp_path / "index")
    record = json.loads((path / PAGES_FILE).read_text())
    record["pages"][0]["index"] = 42
    (path / PAGES_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="page 0 has the key"):
        MultiVectorIndex.load(path)
    hits = index.search(_pages([3], seed=9), k=5)[0]
    assert [hit["rank"] for hit in hits] == [1, 2, 3, 4, 5]
    assert [hit["score"] for hit in hits] == sorted((hit["score"] for hit in hits), reverse=True)


@pytest.mark.parametrize(
    "edit, field",
    [
        ({"dim": "16"}, "dim"),
        ({"dim": None}, "dim"),
        ({"n_pages": -1}, "n_pages"),
        ({"pages": 5}, "pages"),
        ({"pages": None}, "pages"),
        ({"info": []}, "info"),
    ],
)
def test_a_hand_edited_index_json_is_refused_by_name(index, tmp_path, edit, field):
    path = index.save(tmp_path / "index")
    record = {**json.loads((path / PAGES_FILE).read_text()), **edit}
    (path / PAGES_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=f"`{field}` should be"):
        MultiVectorIndex.load(path)
    record = json.loads((path / PAGES_FILE).read_text())
    del record["dim"]
    (path / PAGES_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="`dim` should be a positive whole number, found None"):
        MultiVectorIndex.load(path)
