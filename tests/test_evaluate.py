"""`python -m colqwen3_lib.evaluate` end to end on the tiny checkpoint and the synthetic test sets."""

import json
import runpy
import shutil
import sys

import pytest
import torch

from colqwen3_lib.evaluate import main
from colqwen3_lib.evaluation import evaluate_model
from colqwen3_lib.metrics import K_VALUES, MTEB_K_VALUES, SUMMARY_METRICS, VIDORE_BENCHMARK
from colqwen3_lib.model import load_model
from colqwen3_lib.results import RESULTS_FILE, compare_results
from colqwen3_lib.synthetic import SYNTHETIC_BEIR_TASKS, SYNTHETIC_TASKS

# Small pages keep the tiny model quick; these tests check the vidore-benchmark protocol's files and numbers.
FAST = ["--max-visual-tokens", "32", "--no-progress", "--protocol", "vidore-benchmark"]
CHARTS = "synthetic_charts_test"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small to share out: one thread avoids the OpenMP thread handoff,
    which on a busy 2-core machine made the page forward passes ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "tiny"
    assert run_cli("--model-path", "tiny", "--datasets", "synthetic", "--output-dir", out, *FAST) == 0
    return out


def make_adapter(path, dim=None, seed=1):
    """A LoRA adapter on the tiny model: q/v projections of the language model plus a saved head."""
    from peft import LoraConfig, get_peft_model

    from colqwen3_lib import ColQwen3

    torch.manual_seed(seed)
    base = ColQwen3.from_pretrained("tiny", dim=dim)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=r"language_model\.layers\.\d+\.self_attn\.(q|v)_proj",
        modules_to_save=["custom_text_proj"],
        init_lora_weights="gaussian",
    )
    model = get_peft_model(base, config)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter") / "lora"
    return path, make_adapter(path)


def test_cli_writes_results_for_every_synthetic_task(baseline, capsys):
    files = sorted(p.name for p in baseline.iterdir())
    assert files == sorted(
        [RESULTS_FILE, "summary.csv", "summary.md", *(f"{t}.json" for t in SYNTHETIC_TASKS)]
    )
    results = json.loads((baseline / RESULTS_FILE).read_text())
    assert results["metadata"]["model_path"] == "tiny" and results["metadata"]["max_visual_tokens"] == 32
    assert list(results["results"]) == list(SYNTHETIC_TASKS)
    for task in SYNTHETIC_TASKS:
        per_task = json.loads((baseline / f"{task}.json").read_text())
        assert per_task["task"] == task and per_task["n_pages"] == 32 and 0 < per_task["n_queries"] <= 24
        for k in K_VALUES:
            assert 0.0 <= per_task["metrics"][f"ndcg_at_{k}"] <= 1.0
        assert per_task["metrics"]["recall_at_100"] == 1.0  # all 32 pages are ranked
    summary = (baseline / "summary.md").read_text()
    assert all(f"| {task} |" in summary for task in SYNTHETIC_TASKS) and "| average |" in summary
    csv_header = (baseline / "summary.csv").read_text().splitlines()[0]
    assert csv_header == "task,n_queries,n_pages," + ",".join(SUMMARY_METRICS)


def test_library_call_gives_the_cli_results(baseline):
    model, processor = load_model("tiny", max_visual_tokens=32)
    results = evaluate_model(model, processor, [CHARTS], show_progress=False, protocol=VIDORE_BENCHMARK)
    saved = json.loads((baseline / RESULTS_FILE).read_text())["results"]
    assert results[CHARTS]["metrics"] == pytest.approx(saved[CHARTS]["metrics"], abs=1e-9)


def test_adapter_evaluates_like_the_model_it_was_saved_from(adapter, baseline, tmp_path, capsys):
    path, peft_model = adapter
    out = tmp_path / "adapted"
    assert (
        run_cli("--model-path", "tiny", "--adapter", path, "--datasets", CHARTS, "--output-dir", out, *FAST)
        == 0
    )
    from colqwen3_lib import ColQwen3Processor

    processor = ColQwen3Processor.from_pretrained("tiny", max_num_visual_tokens=32)
    in_memory = evaluate_model(
        peft_model.eval(), processor, [CHARTS], show_progress=False, protocol=VIDORE_BENCHMARK
    )[CHARTS]
    from_cli = json.loads((out / f"{CHARTS}.json").read_text())
    assert from_cli["metadata"]["adapter"] == str(path)
    assert from_cli["metrics"] == pytest.approx(in_memory["metrics"], abs=1e-6)

    # Comparison mode: before (no adapter) vs after (adapter), on the tasks both evaluated.
    capsys.readouterr()
    assert run_cli("--compare", baseline, out, "--output-dir", tmp_path / "cmp") == 0
    printed = capsys.readouterr().out
    assert (
        f"| {CHARTS} |" in printed
        and "delta ndcg_at_5" in printed
        and "synthetic_documents_test" not in printed
    )
    rows = compare_results(baseline, out)
    before = json.loads((baseline / f"{CHARTS}.json").read_text())["metrics"]["ndcg_at_10"]
    assert rows[0]["delta ndcg_at_10"] == pytest.approx(from_cli["metrics"]["ndcg_at_10"] - before)
    assert (tmp_path / "cmp" / "comparison.md").exists() and (tmp_path / "cmp" / "comparison.csv").exists()


def test_adapter_for_another_base_model_is_refused(adapter, tmp_path, capsys):
    path, _ = adapter
    other_base = tmp_path / "other_base"
    shutil.copytree(path, other_base)
    config = json.loads((other_base / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "Qwen/Qwen3-VL-8B-Instruct"
    (other_base / "adapter_config.json").write_text(json.dumps(config))
    assert (
        run_cli("--model-path", "tiny", "--adapter", other_base, "--output-dir", tmp_path / "o1", *FAST) == 2
    )
    assert "trained on 'Qwen/Qwen3-VL-8B-Instruct', but the base model is 'tiny'" in capsys.readouterr().err

    # A head of another size than the base's own (a base without a head takes the adapter's size).
    from colqwen3_lib import ColQwen3, ColQwen3Processor

    headed = tmp_path / "headed"
    ColQwen3.from_pretrained("tiny").save_pretrained(headed)
    ColQwen3Processor.from_pretrained("tiny").save_pretrained(headed)
    wrong_dim = tmp_path / "wrong_dim"
    make_adapter(wrong_dim, dim=64)
    config = json.loads((wrong_dim / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(headed)
    (wrong_dim / "adapter_config.json").write_text(json.dumps(config))
    assert (
        run_cli("--model-path", headed, "--adapter", wrong_dim, "--output-dir", tmp_path / "o2", *FAST) == 2
    )
    err = capsys.readouterr().err
    assert "does not fit the base model" in err and "custom_text_proj.weight: adapter shape [64, 64]" in err

    assert run_cli("--model-path", "tiny", "--adapter", tmp_path, "--output-dir", tmp_path / "o3", *FAST) == 2
    assert "is not a PEFT adapter directory" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists()


def test_dataset_problems_are_named(tmp_path, capsys):
    from colqwen3_lib.data import load_split

    broken = tmp_path / "no_filenames"
    load_split(CHARTS, "test").remove_columns("image_filename").save_to_disk(str(broken))
    assert run_cli("--model-path", "tiny", "--datasets", broken, "--output-dir", tmp_path / "out", *FAST) == 2
    assert "'no_filenames' lacks the column(s) ['image_filename']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli("--model-path", "tiny")  # no --output-dir


# runpy runs the module a second time in this process (the package imported it already): Python's notice of
# that is about the test's method, not the command (`python -m colqwen3_lib.evaluate` prints no warning).
@pytest.mark.filterwarnings("ignore:'colqwen3_lib.evaluate' found in sys.modules:RuntimeWarning")
def test_module_entry_point_compares(baseline, monkeypatch, capsys):
    args = ["python -m colqwen3_lib.evaluate", "--compare", str(baseline), str(baseline / RESULTS_FILE)]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("colqwen3_lib.evaluate", run_name="__main__")
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "| average |" in printed and "+0.00" in printed


def test_processor_saved_with_the_adapter_sets_the_page_size(adapter, tmp_path):
    """The trainer saves its processor next to the adapter: evaluation pages match training pages."""
    from colqwen3_lib import ColQwen3Processor

    path = tmp_path / "with_processor"
    shutil.copytree(adapter[0], path)
    ColQwen3Processor.from_pretrained("tiny", max_num_visual_tokens=16).save_pretrained(path)
    out = tmp_path / "out"
    args = [
        "--model-path",
        "tiny",
        "--adapter",
        path,
        "--datasets",
        CHARTS,
        "--output-dir",
        out,
        "--no-progress",
    ]
    assert run_cli(*args) == 0
    assert json.loads((out / RESULTS_FILE).read_text())["metadata"]["max_visual_tokens"] == 16


def test_each_task_is_written_as_it_completes_so_a_later_failure_loses_nothing(tmp_path, capsys):
    from datasets import Image

    from colqwen3_lib.data import load_split

    broken = tmp_path / "broken_images"
    rows = load_split(CHARTS, "test").cast_column("image", Image(decode=False))
    rows = rows.map(
        lambda row, i: {"image": {"bytes": b"not a png", "path": None}} if i == 3 else row, with_indices=True
    )
    rows.save_to_disk(str(broken))
    out = tmp_path / "out"
    assert run_cli("--model-path", "tiny", "--datasets", CHARTS, broken, "--output-dir", out, *FAST) == 2
    err = capsys.readouterr().err
    assert "broken_images row 3: the image could not be decoded" in err
    assert (
        json.loads((out / f"{CHARTS}.json").read_text())["metrics"]["ndcg_at_5"] >= 0
    )  # the first task is kept
    assert not (out / RESULTS_FILE).exists()


def test_a_reused_output_folder_keeps_no_stale_task_files(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("--model-path", "tiny", "--datasets", "synthetic", "--output-dir", out, *FAST) == 0
    (out / "notes.txt").write_text("mine")
    assert run_cli("--model-path", "tiny", "--datasets", CHARTS, "--output-dir", out, *FAST) == 0
    assert "replacing an earlier evaluation" in capsys.readouterr().out
    task_files = sorted(p.name for p in out.glob("*.json") if p.name != RESULTS_FILE)
    assert task_files == [f"{CHARTS}.json"]
    assert list(json.loads((out / RESULTS_FILE).read_text())["results"]) == [CHARTS]
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
        (["--batch-size", "-4"], "--batch-size: must be at least 1, got -4"),
        (["--max-visual-tokens", "0"], "--max-visual-tokens: must be at least 1, got 0"),
    ],
)
def test_sizes_below_one_are_refused(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--model-path", "tiny", "--output-dir", tmp_path / "out", *flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_cuda_device_without_a_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_cli("--model-path", "tiny", "--device", "cuda", "--output-dir", tmp_path / "out", *FAST) == 2
    assert "no CUDA GPU is visible; pass --device cpu" in capsys.readouterr().err


def test_the_default_protocol_is_mtebs_on_the_synthetic_beir_mirrors(baseline, tmp_path, capsys):
    """`--protocol mteb` (the default) evaluates the BEIR mirrors; on these sets (one page per query, every
    page distinct) NDCG@5 and @10 match the vidore-benchmark protocol's up to mteb's rounding."""
    out = tmp_path / "mteb"
    assert (
        run_cli("--model-path", "tiny", "--output-dir", out, "--max-visual-tokens", "32", "--no-progress")
        == 0
    )
    printed = capsys.readouterr().out
    assert "| synthetic | mteb | ndcg_at_5 |" in printed and "2/2" in printed
    saved = json.loads((out / RESULTS_FILE).read_text())
    assert saved["metadata"]["protocol"] == "mteb" and list(saved["results"]) == list(SYNTHETIC_BEIR_TASKS)
    assert saved["benchmarks"][0]["score"] == pytest.approx(
        sum(r["metrics"]["ndcg_at_5"] for r in saved["results"].values()) / 2
    )
    before = json.loads((baseline / RESULTS_FILE).read_text())["results"]
    for mirror, task in SYNTHETIC_BEIR_TASKS.items():
        per_task = json.loads((out / f"{mirror}.json").read_text())
        assert per_task["protocol"] == "mteb" and per_task["metadata"]["protocol"] == "mteb"
        assert set(per_task["metrics"]) >= {f"ndcg_at_{k}" for k in MTEB_K_VALUES}
        assert before[task]["protocol"] == VIDORE_BENCHMARK
        for metric in ("ndcg_at_5", "ndcg_at_10"):
            assert per_task["metrics"][metric] == pytest.approx(before[task]["metrics"][metric], abs=5e-6)
    assert "| synthetic | mteb |" in (out / "summary.md").read_text()


def test_an_unknown_protocol_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--model-path", "tiny", "--output-dir", tmp_path / "out", "--protocol", "trec")
    assert exit_info.value.code == 2 and "invalid choice: 'trec'" in capsys.readouterr().err


def test_a_folder_of_ones_own_files_is_refused_and_left_as_it_was(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.md").write_text("my notes")
    assert run_cli("--model-path", "tiny", "--datasets", CHARTS, "--output-dir", out, *FAST) == 2
    assert "holds files that are no evaluation's (summary.md)" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["summary.md"] and (
        out / "summary.md"
    ).read_text() == "my notes"


def test_a_failed_evaluation_keeps_the_earlier_one_whole(tmp_path, capsys):
    from datasets import Image

    from colqwen3_lib.data import load_split

    out = tmp_path / "out"
    assert run_cli("--model-path", "tiny", "--datasets", CHARTS, "--output-dir", out, *FAST) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = tmp_path / "broken_images"
    rows = load_split(CHARTS, "test").cast_column("image", Image(decode=False))
    rows = rows.map(
        lambda row, i: {"image": {"bytes": b"x", "path": None}} if i == 2 else row, with_indices=True
    )
    rows.save_to_disk(str(broken))
    capsys.readouterr()
    assert run_cli("--model-path", "tiny", "--datasets", CHARTS, broken, "--output-dir", out, *FAST) == 2
    assert "the earlier evaluation in" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    partial = out / "partial-evaluation"
    assert [p.name for p in partial.iterdir()] == [f"{CHARTS}.json"]
    assert not (out / ".evaluating").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "gpu0"], "device 'gpu0' is not a device torch knows"),
        (["--device", "mps"], "device mps was asked for, but this machine has no Apple GPU"),
        (["--datasets", "synthetic,vidore-v9"], "dataset 'vidore-v9' is neither a local path nor"),
    ],
)
def test_a_bad_device_or_dataset_name_is_one_line_before_any_work(
    tmp_path, capsys, monkeypatch, flags, message
):
    from colqwen3_lib import evaluation

    if "mps" in flags and __import__("torch").backends.mps.is_available():
        pytest.skip("this machine has an Apple GPU")
    monkeypatch.setattr(
        evaluation, "evaluate_model", lambda *a, **k: pytest.fail("evaluated before refusing")
    )
    assert run_cli("--model-path", "tiny", "--output-dir", tmp_path / "out", *FAST, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
