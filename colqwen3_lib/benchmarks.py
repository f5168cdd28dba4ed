"""The benchmarks the kit can name: ViDoRe v1, v2 and v3 as mteb pins them (the public leaderboard's), ViDoRe v1
as vidore-benchmark names it, and the synthetic test sets; what each alias means under each protocol.

Under `mteb` (`metrics.PROTOCOLS`), `vidore-v1`, `vidore-v2` and `vidore-v3` name mteb's datasets at the
revisions mteb pins (public tasks only: ViDoRe v3's Telecom and Nuclear tasks are private), and `synthetic`
the synthetic sets' BEIR mirrors. Under `vidore-benchmark`, `vidore-v1` names the ten ViDoRe v1 QA sets and
`synthetic` the synthetic QA sets. A benchmark's score is the mean over its tasks of its main score.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .metrics import MAIN_SCORE, MTEB, PROTOCOL, VIDORE_BENCHMARK, check_protocol
from .synthetic import SYNTHETIC, SYNTHETIC_BEIR_TASKS, SYNTHETIC_TASKS


@dataclass(frozen=True)
class BenchmarkTask:
    """One task of a benchmark: its dataset, pinned revision and, for mteb, its name and language subsets."""

    path: str
    revision: str | None = None
    mteb_name: str | None = None
    languages: tuple[str, ...] = ()  # mteb's subsets: v2, the queries' `language`; v3, the config prefixes

    @property
    def spec(self) -> str:
        """How `load_task` names it: `path@revision` (or the path alone)."""
        return f"{self.path}@{self.revision}" if self.revision else self.path


@dataclass(frozen=True)
class Benchmark:
    """A named set of tasks and the metric its score is the mean of (over tasks; a task's over its subsets)."""

    alias: str
    name: str
    main_score: str
    tasks: tuple[BenchmarkTask, ...]
    private: tuple[str, ...] = ()  # tasks of the benchmark whose data is not public (left out)


VIDORE_V1, VIDORE_V2, VIDORE_V3 = "vidore-v1", "vidore-v2", "vidore-v3"
V2_LANGUAGES = ("french", "spanish", "english", "german")
V3_LANGUAGES = ("french", "spanish", "english", "german", "italian", "portuguese")

# The ViDoRe v1 benchmark (QA format, split `test`), as vidore-benchmark names it.
VIDORE_V1_TASKS = (
    "vidore/arxivqa_test_subsampled",
    "vidore/docvqa_test_subsampled",
    "vidore/infovqa_test_subsampled",
    "vidore/tabfquad_test_subsampled",
    "vidore/tatdqa_test",
    "vidore/shiftproject_test",
    "vidore/syntheticDocQA_artificial_intelligence_test",
    "vidore/syntheticDocQA_energy_test",
    "vidore/syntheticDocQA_government_reports_test",
    "vidore/syntheticDocQA_healthcare_industry_test",
)

# mteb's ViDoRe tasks, benchmarks ViDoRe(v1), ViDoRe(v2) and ViDoRe(v3), with the dataset revisions mteb pins
# (mteb 2.26: mteb/tasks/retrieval/eng/vidore_bench_retrieval.py, multilingual/vidore2_bench_retrieval.py,
# multilingual/vidore3_bench_retrieval.py; the benchmarks in mteb/benchmarks/benchmarks/benchmarks.py).
MTEB_VIDORE_V1 = (
    BenchmarkTask(
        "mteb/arxivqa_test_subsampled_beir",
        "179762404662be6bf48c30b4fb2b2ef8c6891290",
        "VidoreArxivQARetrieval",
    ),
    BenchmarkTask(
        "mteb/docvqa_test_subsampled_beir",
        "e78cd130055fcb8d69bb0ff4115c4712a157f3d3",
        "VidoreDocVQARetrieval",
    ),
    BenchmarkTask(
        "mteb/infovqa_test_subsampled_beir",
        "74d396242cc281c021eeb38d0ee5f6f30afc1fad",
        "VidoreInfoVQARetrieval",
    ),
    BenchmarkTask(
        "mteb/tabfquad_test_subsampled_beir",
        "24a4541c4c461f5ff4f4af4e97ec820715281a06",
        "VidoreTabfquadRetrieval",
    ),
    BenchmarkTask(
        "mteb/tatdqa_test_beir", "dc7924ec102addd7f85c1ccfdd8625848179f615", "VidoreTatdqaRetrieval"
    ),
    BenchmarkTask(
        "mteb/shiftproject_test_beir",
        "78e6f5ad3bbc1af50ae9c0f006f57462213269fb",
        "VidoreShiftProjectRetrieval",
    ),
    BenchmarkTask(
        "mteb/syntheticDocQA_artificial_intelligence_test_beir",
        "12c5b7a81fc19d66f1844642acdb88e8ad79af16",
        "VidoreSyntheticDocQAAIRetrieval",
    ),
    BenchmarkTask(
        "mteb/syntheticDocQA_energy_test_beir",
        "eda52c9a0519252cfaacb7ae5e5da516b7d4b8cb",
        "VidoreSyntheticDocQAEnergyRetrieval",
    ),
    BenchmarkTask(
        "mteb/syntheticDocQA_government_reports_test_beir",
        "ec534abea699035a18f9fd76f215277de9db9600",
        "VidoreSyntheticDocQAGovernmentReportsRetrieval",
    ),
    BenchmarkTask(
        "mteb/syntheticDocQA_healthcare_industry_test_beir",
        "81d53880628d641aaf7365f3b2e65f57c814ecca",
        "VidoreSyntheticDocQAHealthcareIndustryRetrieval",
    ),
)
MTEB_VIDORE_V2 = (
    BenchmarkTask(
        "vidore/esg_reports_v2",
        "0542c0d03da0ec1c8cbc517c8d78e7e95c75d3d3",
        "Vidore2ESGReportsRetrieval",
        V2_LANGUAGES,
    ),
    BenchmarkTask(
        "vidore/economics_reports_v2",
        "b3e3a04b07fbbaffe79be49dabf92f691fbca252",
        "Vidore2EconomicsReportsRetrieval",
        V2_LANGUAGES,
    ),
    BenchmarkTask(
        "vidore/biomedical_lectures_v2",
        "a29202f0da409034d651614d87cd8938d254e2ea",
        "Vidore2BioMedicalLecturesRetrieval",
        V2_LANGUAGES,
    ),
    BenchmarkTask(
        "vidore/esg_reports_human_labeled_v2",
        "6d467dedb09a75144ede1421747e47cf036857dd",
        "Vidore2ESGReportsHLRetrieval",
    ),
)
MTEB_VIDORE_V3 = tuple(
    BenchmarkTask(f"vidore/vidore_v3_{slug}_mteb_format", revision, name, V3_LANGUAGES)
    for slug, revision, name in (
        ("finance_en", "fa78cb14152b3dde8c5defdc4e3ddf50de69dfeb", "Vidore3FinanceEnRetrieval"),
        ("industrial", "f732b725cf4a70803210edfe265a04f8bd5328f6", "Vidore3IndustrialRetrieval"),
        ("computer_science", "fb7fb69f81f7db62790f40494124b8ad22b424ab", "Vidore3ComputerScienceRetrieval"),
        ("pharmaceuticals", "237ed4f43c7fb3c4df07ec4e9dd0a4366be555b0", "Vidore3PharmaceuticalsRetrieval"),
        ("hr", "bc7d43d64815ed30f664168c8052106484aba7fd", "Vidore3HrRetrieval"),
        ("finance_fr", "8a2adfda85a7967c7252129703d9b3c7c9f038a9", "Vidore3FinanceFrRetrieval"),
        ("physics", "2c18ef90ab3ef93a9d86ecc6521cdae2a29f8300", "Vidore3PhysicsRetrieval"),
        ("energy", "84fca99e5978604bae30f2436eacb6dbaa0532e9", "Vidore3EnergyRetrieval"),
    )
)
V3_PRIVATE = ("Vidore3TelecomRetrieval", "Vidore3NuclearRetrieval")  # mteb-private/...: not downloadable


def _benchmarks(v1: tuple[BenchmarkTask, ...], synthetic: Iterable[str]) -> dict[str, Benchmark]:
    return {
        VIDORE_V1: Benchmark(VIDORE_V1, "ViDoRe(v1)", "ndcg_at_5", v1),
        VIDORE_V2: Benchmark(VIDORE_V2, "ViDoRe(v2)", "ndcg_at_5", MTEB_VIDORE_V2),
        VIDORE_V3: Benchmark(VIDORE_V3, "ViDoRe(v3)", "ndcg_at_10", MTEB_VIDORE_V3, V3_PRIVATE),
        SYNTHETIC: Benchmark(SYNTHETIC, "synthetic", MAIN_SCORE, tuple(BenchmarkTask(n) for n in synthetic)),
    }


# What each alias names under each protocol. mteb: its own datasets (ViDoRe v1 as its BEIR mirrors) and the
# synthetic sets' BEIR mirrors; vidore-benchmark: the ViDoRe v1 QA sets and the synthetic QA sets (ViDoRe v2
# and v3 are mteb's datasets there too, each scored as one pool of queries).
BENCHMARKS = {
    MTEB: _benchmarks(MTEB_VIDORE_V1, SYNTHETIC_BEIR_TASKS),
    VIDORE_BENCHMARK: _benchmarks(tuple(BenchmarkTask(n) for n in VIDORE_V1_TASKS), SYNTHETIC_TASKS),
}
ALIASES = tuple(BENCHMARKS[MTEB])
KNOWN_TASKS = {task.path: task for bench in BENCHMARKS[MTEB].values() for task in bench.tasks}


def split_revision(name: str) -> tuple[str, str | None]:
    """`owner/name@revision` -> (`owner/name`, `revision`); a local path or a name without `@` has no revision."""
    if os.path.exists(name) or "@" not in name:
        return name, None
    path, revision = name.rsplit("@", 1)
    return path, revision or None


def benchmark_of(name: str, protocol: str = PROTOCOL, revision: str | None = None) -> Benchmark | None:
    """The benchmark that `name` (a task name, or `path@revision`) belongs to under `protocol`, if any.

    A hub dataset belongs when its path is the benchmark's and its revision is the pinned one (or unset).
    """
    path, given = split_revision(str(name))
    revision = revision or given
    for bench in BENCHMARKS[check_protocol(protocol)].values():
        for task in bench.tasks:
            if task.path == path and revision in (None, task.revision):
                return bench
    return None


def local_copy_of(path: str | os.PathLike) -> BenchmarkTask | None:
    """The benchmark task a local folder is a copy of, recognised by its name: a folder named as the hub
    dataset (`esg_reports_v2`, `vidore_v3_hr_mteb_format`), or inside the hub cache's `datasets--owner--name`."""
    parts = Path(path).resolve().parts
    for task in KNOWN_TASKS.values():
        owner, _, name = task.path.rpartition("/")
        if owner and (name in parts or f"datasets--{owner}--{name}" in parts):
            return task
    return None
