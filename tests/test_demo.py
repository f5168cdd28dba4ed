"""`python -m colqwen3_lib.demo`: the one-minute end-to-end check."""

from colqwen3_lib.demo import main


def test_the_demo_retrieves_the_top_pages_offline(capsys):
    assert main(["--n-queries", "2", "--max-visual-tokens", "32"]) == 0
    out = capsys.readouterr().out
    assert out.count("Q: ") == 2 and "   1. " in out and "   5. " in out


def test_a_missing_dataset_is_one_line(tmp_path, capsys):
    assert main(["--dataset", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset") and "does not exist" in err
