"""Evaluation tasks: ViDoRe QA, BEIR and per-language datasets reduced to queries, pages and qrels under both
protocols; dataset names and aliases."""

import shutil

import pytest
from datasets import Dataset, DatasetDict

from colqwen3_lib.benchmarks import benchmark_of
from colqwen3_lib.metrics import MTEB, VIDORE_BENCHMARK
from colqwen3_lib.synthetic import SYNTHETIC_TASKS, write_beir_mirror
from colqwen3_lib.tasks import (
    BEIR,
    BEIR_COLUMNS,
    QA,
    VIDORE_V1_TASKS,
    expand_datasets,
    load_task,
    qa_task,
)

# ------------------------------------------------------------------ QA format


def test_qa_task_structure(qa_dir):
    task = load_task(qa_dir, protocol=VIDORE_BENCHMARK)
    assert task.name == "tiny_qa_test" and task.format == QA
    assert task.queries == ["A", "B", "C"]  # de-duplicated, distractors dropped
    assert len(task.images) == 6  # rows 2 and 4 hold the same image
    assert task.n_documents == 5  # distinct filenames
    relevant = {q: next(iter(task.qrels[qid])) for q, qid in zip(task.queries, task.query_ids)}
    assert relevant == {"A": "p3.png", "B": "p2.png", "C": "p4.png"}
    assert all(list(judged.values()) == [1] for judged in task.qrels.values())


def test_qa_errors_name_the_problem(tmp_path, qa_dataset):
    no_filename = qa_dataset().remove_columns("image_filename")
    with pytest.raises(ValueError, match="image_filename"):
        qa_task(no_filename, "broken")
    with pytest.raises(ValueError, match="empty"):
        qa_task(qa_dataset().select([]), "empty_set")
    with pytest.raises(ValueError, match="no queries"):
        qa_task(qa_dataset([(None, 0, "a.png"), (None, 1, "b.png")]), "distractors_only")
    with pytest.raises(ValueError, match="neither a local path nor a Hugging Face Hub id"):
        load_task("no_such_dataset")
    (tmp_path / "no_data").mkdir()
    with pytest.raises(ValueError, match="no_data' holds no data"):
        load_task(tmp_path / "no_data")


# ------------------------------------------------------------------ BEIR format


def test_beir_missing_column(beir_dir, tmp_path):
    broken = tmp_path / "broken_beir"
    shutil.copytree(beir_dir, broken)
    shutil.rmtree(broken / "qrels")
    qrels = Dataset.from_dict({"query-id": [1], "corpus-id": [2]})
    DatasetDict(test=qrels).save_to_disk(str(broken / "qrels"))
    with pytest.raises(ValueError, match=r"qrels.*\['score'\]"):
        load_task(broken)


# ------------------------------------------------------------------ dataset names


def test_names_expand_to_tasks():
    assert expand_datasets(["synthetic"], VIDORE_BENCHMARK) == list(SYNTHETIC_TASKS)
    assert expand_datasets(["vidore-v1"], VIDORE_BENCHMARK) == list(VIDORE_V1_TASKS)
    assert len(VIDORE_V1_TASKS) == 10
    assert expand_datasets(["vidore/docvqa_test_subsampled,vidore/tatdqa_test"]) == [
        "vidore/docvqa_test_subsampled",
        "vidore/tatdqa_test",
    ]


def test_hub_ids_load_the_test_split(qa_dir, beir_dir, monkeypatch):
    """ViDoRe hub ids go through datasets.load_dataset(name[, config], split=...); offline, local stand-ins answer."""
    import datasets

    from colqwen3_lib.data import load_split

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "vidore/docvqa_test_subsampled":
            return load_split(qa_dir, split)
        if name == "vidore/esg_reports_v2":
            return load_split(beir_dir / config, split)
        raise ConnectionError(f"no network for {name}")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(
        datasets,
        "get_dataset_config_names",
        lambda name: ["corpus", "queries", "qrels"] if name == "vidore/esg_reports_v2" else ["default"],
    )
    qa = load_task("vidore/docvqa_test_subsampled", protocol=VIDORE_BENCHMARK)
    assert (qa.name, qa.format, qa.queries) == ("vidore/docvqa_test_subsampled", QA, ["A", "B", "C"])
    assert calls == [("vidore/docvqa_test_subsampled", None, "test")]
    beir = load_task("vidore/esg_reports_v2", protocol=VIDORE_BENCHMARK)
    assert beir.format == BEIR and set(calls[1:]) == {
        ("vidore/esg_reports_v2", p, "test") for p in BEIR_COLUMNS
    }
    with pytest.raises(ValueError, match="could not load 'owner/offline'.*local copy"):
        load_task("owner/offline")


# ------------------------------------------------------------------ the mteb protocol


def test_mteb_reads_a_qa_set_as_its_beir_mirror(qa_dir, tmp_path, qa_dataset):
    """Every distinct image is a document; every row of a repeated query is relevant (rows 1 and 3 for A)."""
    task = load_task(qa_dir, protocol=MTEB)
    assert task.queries == ["A", "B", "C"] and task.n_documents == 6
    relevant = {q: task.qrels[qid] for q, qid in zip(task.queries, task.query_ids)}
    assert relevant == {"A": {"1": 1, "3": 1}, "B": {"2": 1}, "C": {"4": 1}}
    # The mirror written to disk reads back as the same task.
    write_beir_mirror(qa_dataset(), tmp_path / "tiny_qa_test_beir")
    mirror = load_task(tmp_path / "tiny_qa_test_beir", protocol=MTEB)
    assert mirror.format == BEIR and (mirror.queries, mirror.query_ids) == (task.queries, task.query_ids)
    assert mirror.qrels == task.qrels and mirror.image_docs == task.image_docs


def test_mtebs_per_language_layout_keeps_each_language_apart(per_language_dir):
    task = load_task(per_language_dir)
    assert task.subsets == {"english": ["english/q1", "english/q2"], "french": ["french/q1", "french/q2"]}
    assert task.queries == ["first", "second", "premier", "second fr"] and task.n_documents == 3
    assert task.qrels["english/q2"] == {"c1": 2} and task.qrels["french/q2"] == {"c2": 1}


def test_mtebs_v2_tasks_are_split_by_the_queries_language(beir_dir, monkeypatch):
    """A pinned hub revision reaches every load; ViDoRe v2's multilingual tasks get mteb's language subsets."""
    import datasets

    from colqwen3_lib.data import load_split

    calls = []

    def fake_load_dataset(name, config=None, split=None, revision=None):
        calls.append((name, config, revision))
        rows = load_split(beir_dir / config, split)
        if config == "queries":
            rows = rows.add_column("language", ["english", "french", "english"])
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(datasets, "get_dataset_config_names", lambda name, revision=None: list(BEIR_COLUMNS))
    spec = next(s for s in expand_datasets(["vidore-v2"]) if s.startswith("vidore/esg_reports_v2@"))
    task = load_task(spec)
    assert task.name == "vidore/esg_reports_v2" and task.revision == spec.split("@")[1]
    assert {revision for _, _, revision in calls} == {task.revision}
    assert task.subsets == {"french": ["2"], "spanish": [], "english": ["1", "3"], "german": []}
    assert load_task(spec, protocol=VIDORE_BENCHMARK).subsets == {}  # vidore-benchmark: one pool of queries


def test_mtebs_v3_tasks_load_each_language_from_the_hub(per_language_dir, monkeypatch):
    import datasets

    from colqwen3_lib.data import load_split

    configs = sorted(p.name for p in per_language_dir.iterdir())
    monkeypatch.setattr(datasets, "get_dataset_config_names", lambda name, revision=None: configs)
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda name, config, split, revision: load_split(per_language_dir / config, split),
    )
    spec = expand_datasets(["vidore-v3"])[0]
    task = load_task(spec)
    assert task.name == "vidore/vidore_v3_finance_en_mteb_format" and list(task.subsets) == [
        "english",
        "french",
    ]
    assert benchmark_of(task.name, revision=task.revision).main_score == "ndcg_at_10"


def test_a_beir_folder_without_its_qrels_is_named(beir_dir, tmp_path):
    import shutil

    broken = tmp_path / "no_qrels"
    shutil.copytree(beir_dir, broken)
    shutil.rmtree(broken / "qrels")
    with pytest.raises(ValueError, match=r"looks like a BEIR dataset \(corpus, queries\) but has no qrels"):
        load_task(broken)


def test_a_language_missing_one_of_its_parts_is_refused_not_left_out(per_language_dir, tmp_path):
    """Without french-qrels the task would be scored on english alone and reported as the dataset's average."""
    import shutil

    broken = tmp_path / "tiny_v3"
    shutil.copytree(per_language_dir, broken)
    shutil.rmtree(broken / "french-qrels")
    with pytest.raises(ValueError, match="the french part of this per-language dataset has no french-qrels"):
        load_task(broken)
    shutil.rmtree(broken / "french-corpus")
    shutil.rmtree(broken / "french-queries")
    assert list(load_task(broken).subsets) == ["english"]  # a language left out whole, on purpose


# ------------------------------------------------------------------ local copies of ViDoRe tasks


def _copy_with_languages(beir_dir, dst):
    """The tiny BEIR set with a `language` column on its queries, as ViDoRe v2's multilingual tasks have."""
    shutil.copytree(beir_dir, dst)
    queries = Dataset.from_dict(
        {
            "query-id": [1, 2, 3],
            "query": ["first", "second", "unjudged"],
            "language": ["english", "french", "english"],
        }
    )
    shutil.rmtree(dst / "queries")
    DatasetDict(test=queries).save_to_disk(str(dst / "queries"))
    return dst


@pytest.mark.parametrize("where", ["named-as-the-hub", "hub-cache", "said-by-the-user"])
def test_a_local_copy_of_a_v2_task_is_split_by_language_as_mteb_splits_it(beir_dir, tmp_path, where):
    if where == "named-as-the-hub":
        spec = str(_copy_with_languages(beir_dir, tmp_path / "esg_reports_v2"))
    elif where == "hub-cache":
        spec = str(
            _copy_with_languages(beir_dir, tmp_path / "datasets--vidore--esg_reports_v2" / "snapshots" / "a1")
        )
    else:
        spec = f"{_copy_with_languages(beir_dir, tmp_path / 'my_esg')}=vidore/esg_reports_v2"
    task = load_task(spec, protocol=MTEB)
    assert task.copy_of == "vidore/esg_reports_v2"
    assert task.subsets == {"french": ["2"], "spanish": [], "english": ["1", "3"], "german": []}
    assert benchmark_of(task.copy_of).main_score == "ndcg_at_5"
    assert load_task(spec, protocol=VIDORE_BENCHMARK).subsets == {}  # one pool of queries, as for the hub id


def test_a_local_copy_of_a_v3_task_is_scored_by_v3s_main_score(per_language_dir, tmp_path):
    named = tmp_path / "vidore_v3_hr_mteb_format"
    shutil.copytree(per_language_dir, named)
    for spec in (named, f"{per_language_dir}=vidore/vidore_v3_hr_mteb_format"):
        task = load_task(spec)
        assert task.copy_of == "vidore/vidore_v3_hr_mteb_format" and list(task.subsets) == [
            "english",
            "french",
        ]
        assert benchmark_of(task.copy_of).main_score == "ndcg_at_10"
    assert load_task(per_language_dir).copy_of is None  # a folder of another name is not guessed at


def test_a_copy_of_a_task_the_kit_does_not_know_is_refused_before_any_work(per_language_dir, tmp_path):
    with pytest.raises(ValueError, match="'vidore/nope' is not a ViDoRe task the kit knows"):
        expand_datasets([f"{per_language_dir}=vidore/nope"])
    with pytest.raises(ValueError, match="does not exist; before '=' give the folder"):
        expand_datasets([f"{tmp_path / 'missing'}=vidore/esg_reports_v2"])
