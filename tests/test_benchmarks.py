"""The benchmarks the kit can name: the aliases under each protocol, and mteb's pinned datasets (checked against
mteb's own task definitions when mteb is installed)."""

import pytest

from colqwen3_lib.benchmarks import BENCHMARKS, VIDORE_V1_TASKS, benchmark_of, split_revision
from colqwen3_lib.metrics import MTEB, VIDORE_BENCHMARK
from colqwen3_lib.synthetic import SYNTHETIC_BEIR_TASKS, SYNTHETIC_TASKS
from colqwen3_lib.tasks import expand_datasets


def test_the_aliases_name_mtebs_pinned_datasets():
    v1 = expand_datasets(["vidore-v1"])
    assert len(v1) == 10
    assert v1[1] == "mteb/docvqa_test_subsampled_beir@e78cd130055fcb8d69bb0ff4115c4712a157f3d3"
    assert [split_revision(spec)[0] for spec in v1] == [
        f"mteb/{n.split('/')[1]}_beir" for n in VIDORE_V1_TASKS
    ]
    assert len(expand_datasets(["vidore-v2"])) == 4
    assert len(expand_datasets(["vidore-v3"])) == 8  # the public tasks
    assert expand_datasets(["synthetic"]) == list(SYNTHETIC_BEIR_TASKS)
    assert expand_datasets(["synthetic"], VIDORE_BENCHMARK) == list(SYNTHETIC_TASKS)
    v3 = BENCHMARKS[MTEB]["vidore-v3"]
    assert v3.main_score == "ndcg_at_10" and v3.private == (
        "Vidore3TelecomRetrieval",
        "Vidore3NuclearRetrieval",
    )
    with pytest.raises(ValueError, match="unknown evaluation protocol"):
        expand_datasets(["vidore-v1"], "trec")


def test_a_dataset_belongs_to_a_benchmark_at_its_pinned_revision():
    v1 = expand_datasets(["vidore-v1"])
    assert benchmark_of(v1[0]).alias == "vidore-v1"
    assert benchmark_of("mteb/tatdqa_test_beir").alias == "vidore-v1"  # no revision: the hub's main branch
    assert benchmark_of("mteb/tatdqa_test_beir@0123abc") is None  # another revision is not the benchmark's
    assert benchmark_of("vidore/tatdqa_test", VIDORE_BENCHMARK).alias == "vidore-v1"
    assert benchmark_of("vidore/tatdqa_test") is None  # under mteb, ViDoRe v1 is the BEIR mirrors
    assert benchmark_of("synthetic_charts_test_beir").alias == "synthetic"


@pytest.mark.parametrize(
    "alias, name", [("vidore-v1", "ViDoRe(v1)"), ("vidore-v2", "ViDoRe(v2)"), ("vidore-v3", "ViDoRe(v3)")]
)
def test_the_pins_are_mtebs(alias, name):
    """Each benchmark's public tasks, datasets, revisions, main score and language subsets, as the installed mteb defines them."""
    mteb = pytest.importorskip(
        "mteb", reason="mteb is not installed: pip install 'colqwen3-lib[mteb]' (make test installs it)"
    )
    ours = BENCHMARKS[MTEB][alias]
    theirs = mteb.get_benchmark(name).tasks
    assert [t.mteb_name for t in ours.tasks] == [t.metadata.name for t in theirs if t.metadata.is_public]
    assert list(ours.private) == [t.metadata.name for t in theirs if not t.metadata.is_public]
    for task, their in zip(ours.tasks, (t for t in theirs if t.metadata.is_public)):
        assert (task.path, task.revision) == (
            their.metadata.dataset["path"],
            their.metadata.dataset["revision"],
        )
        assert their.metadata.main_score == ours.main_score
        subsets = their.metadata.hf_subsets
        assert list(task.languages) == ([] if subsets == ["default"] else subsets)
