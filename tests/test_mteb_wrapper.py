"""mteb's own evaluation on a kit model (`ColQwen3Encoder`) gives the kit's `mteb`-protocol numbers.

These tests need mteb (the `mteb` extra, which `make test` installs); without it they are skipped and say so,
except the one that checks that the kit itself never needs mteb.
"""

import subprocess
import sys

import pytest
import torch

from colqwen3_lib.evaluation import evaluate_model
from colqwen3_lib.metrics import MTEB
from colqwen3_lib.synthetic import SYNTHETIC_BEIR_TASKS, write_beir_mirror

NO_MTEB = "mteb is not installed: pip install 'colqwen3-lib[mteb]' (make test installs it)"


@pytest.fixture(scope="module")
def mteb():
    return pytest.importorskip("mteb", reason=NO_MTEB)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mteb_scores(mteb, model, processor, tasks) -> dict[str, dict]:
    """mteb.evaluate on the wrapped model: task name -> its scores (one split, one subset)."""
    from colqwen3_lib.mteb_wrapper import ColQwen3Encoder

    results = mteb.evaluate(ColQwen3Encoder(model, processor), tasks, cache=None, show_progress_bar=False)
    return {r.task_name: r.scores["test"][0] for r in results.task_results}


def test_mteb_evaluate_gives_the_kits_numbers_on_the_synthetic_mirrors(mteb, model, processor):
    from colqwen3_lib.mteb_wrapper import local_retrieval_task

    ours = evaluate_model(model, processor, ["synthetic"], show_progress=False, protocol=MTEB)
    assert list(ours) == list(SYNTHETIC_BEIR_TASKS)
    theirs = mteb_scores(mteb, model, processor, [local_retrieval_task(name) for name in ours])
    for name, result in ours.items():
        for metric in ("ndcg_at_5", "ndcg_at_10"):
            assert theirs[name][metric] == pytest.approx(result["metrics"][metric], abs=1e-6), (name, metric)
        shared = {m: theirs[name][m] for m in result["metrics"]}
        assert shared == pytest.approx(result["metrics"], abs=1e-6)
        assert theirs[name]["main_score"] == theirs[name]["ndcg_at_5"]


def test_a_qa_set_read_by_the_kit_scores_as_mteb_scores_its_mirror(
    mteb, model, processor, qa_dir, qa_dataset, tmp_path
):
    """The kit reads a QA set (a repeated query, a repeated image) as its BEIR mirror; mteb, on that mirror
    written to disk, gives the same numbers."""
    from colqwen3_lib.mteb_wrapper import local_retrieval_task

    ours = evaluate_model(model, processor, [qa_dir], show_progress=False, protocol=MTEB)["tiny_qa_test"]
    mirror = write_beir_mirror(qa_dataset(), tmp_path / "tiny_qa_test")
    theirs = mteb_scores(mteb, model, processor, [local_retrieval_task(mirror)])["tiny_qa_test"]
    assert {m: theirs[m] for m in ours["metrics"]} == pytest.approx(ours["metrics"], abs=1e-6)


def test_the_wrapper_scores_padded_embeddings_exactly(mteb, model, processor):
    from colqwen3_lib.evaluation import embed_queries
    from colqwen3_lib.mteb_wrapper import ColQwen3Encoder
    from colqwen3_lib.scoring import score_multi_vector

    queries = embed_queries(model, processor, ["a red pie chart", "an invoice"])
    pages = [torch.nn.functional.normalize(torch.randn(n, queries[0].shape[1]), dim=-1) for n in (3, 7)]
    padded = [torch.nn.utils.rnn.pad_sequence(x, batch_first=True) for x in (queries, pages)]
    encoder = ColQwen3Encoder(model, processor)
    assert torch.equal(encoder.similarity(*padded), score_multi_vector(queries, pages))
    pairwise = encoder.similarity_pairwise(*padded)
    assert pairwise.tolist() == pytest.approx(
        score_multi_vector(queries, pages).diagonal().tolist(), abs=1e-6
    )
    assert encoder.mteb_model_meta.model_type == ["late-interaction"]


def test_the_kit_never_needs_mteb():
    """Without mteb the kit imports and evaluates under the mteb protocol; only the wrapper asks for it."""
    code = (
        "import sys; sys.modules['mteb'] = None\n"
        "import colqwen3_lib, colqwen3_lib.evaluate, colqwen3_lib.evaluation\n"
        "try:\n    import colqwen3_lib.mteb_wrapper\nexcept ImportError as err:\n    print(err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "pip install 'colqwen3-lib[mteb]'" in result.stdout
