"""The papermill course runner, on small stand-in notebooks (the real ones run in test_course_run.py), and
`make lab`, which opens the course in JupyterLab."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from colqwen3_lib.course import NotebookFailed, _parse_value, main, run_course


def _notebook(path, params: str, body: str):
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    cell = new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [new_code_cell("import json, pathlib"), cell, new_code_cell(body)]
    nbformat.write(nb, path)


WRITE_METRICS = "pathlib.Path(OUTPUT_DIR, 'metrics.json').write_text(json.dumps({metrics}))"


@pytest.fixture
def stand_ins(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _notebook(
        folder / "00_setup_check.ipynb",
        'OUTPUT_DIR: str = "."  # where metrics go\nMAX_STEPS: int = 5  # steps',
        WRITE_METRICS.format(metrics="{'max_steps': MAX_STEPS}"),
    )
    _notebook(
        folder / "03_lora_training.ipynb",
        'OUTPUT_DIR: str = "."  # where metrics go',
        WRITE_METRICS.format(metrics="{'adapter_path': str(pathlib.Path(OUTPUT_DIR, 'adapter'))}"),
    )
    _notebook(
        folder / "04_vidore_eval.ipynb",
        'OUTPUT_DIR: str = "."  # where metrics go\nADAPTER_PATH: str = ""  # adapter',
        WRITE_METRICS.format(metrics="{'adapter_seen': ADAPTER_PATH}"),
    )
    _notebook(
        folder / "05_troubleshooting_oom.ipynb",
        'OUTPUT_DIR: str = "."  # where metrics go',
        "raise ValueError('simulated failure')",
    )
    return folder


def test_runs_in_order_passes_parameters_and_the_adapter(stand_ins, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the kernels' sockets go
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "run"
    rows = run_course(
        "tiny",
        out,
        {"MAX_STEPS": 7},
        only=["00_setup_check", "03_lora_training", "04_vidore_eval"],
        notebooks_dir=stand_ins,
        progress=False,
    )
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]
    assert rows[0]["metrics"] == {"max_steps": 7}
    assert rows[2]["metrics"]["adapter_seen"] == str(out / "03_lora_training" / "adapter")
    summary = json.loads((out / "summary.json").read_text())
    assert [r["notebook"] for r in summary] == ["00_setup_check", "03_lora_training", "04_vidore_eval"]
    assert all(r["seconds"] > 0 for r in summary)
    for name in ("00_setup_check", "03_lora_training", "04_vidore_eval"):
        assert (out / f"{name}.ipynb").exists() and (out / "html" / f"{name}.html").exists()
    assert "04_vidore_eval.html" in (out / "index.html").read_text()
    assert "| 00_setup_check | ok |" in (out / "summary.md").read_text()
    first, middle, last = (out / "html" / f"{row['notebook']}.html" for row in rows)
    assert 'rel="next" href="03_lora_training.html"' in first.read_text()  # the run's pages link each other
    assert 'rel="prev"' not in first.read_text()
    assert 'rel="prev" href="00_setup_check.html"' in middle.read_text()
    assert 'rel="next"' not in last.read_text() and 'href="../index.html"' in last.read_text()
    assert not list((tmp_path / "tmp").glob("colqwen3-kernels-*"))  # the kernels' socket folder is gone


def test_a_rerun_hands_the_trained_adapter_on_but_not_back_to_the_untrained_lesson(stand_ins, tmp_path):
    """02 teaches the untrained head: a rerun into a folder whose 03 trained an adapter gives it to 04, not 02."""
    _notebook(
        stand_ins / "02_model_and_late_interaction.ipynb",
        'OUTPUT_DIR: str = "."  # where metrics go\nADAPTER_PATH: str = ""  # adapter',
        WRITE_METRICS.format(metrics="{'adapter_seen': ADAPTER_PATH}"),
    )
    out, adapter = tmp_path / "run", str(tmp_path / "run" / "03_lora_training" / "adapter")
    run_course("tiny", out, only=["03_lora_training"], notebooks_dir=stand_ins, progress=False)
    again = ["02_model_and_late_interaction", "04_vidore_eval"]
    rows = run_course("tiny", out, only=again, notebooks_dir=stand_ins, progress=False)
    assert [r["metrics"]["adapter_seen"] for r in rows] == ["", adapter]
    rows = run_course(
        "tiny", out, {"ADAPTER_PATH": "mine"}, only=again, notebooks_dir=stand_ins, progress=False
    )
    assert [r["metrics"]["adapter_seen"] for r in rows] == ["mine", "mine"]  # said by the user: for all


def test_a_failing_notebook_stops_the_run_and_keeps_earlier_results(stand_ins, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(
        NotebookFailed, match=r"05_troubleshooting_oom failed in cell .*ValueError: simulated failure"
    ):
        run_course(
            "tiny",
            out,
            only=["00_setup_check", "05_troubleshooting_oom"],
            notebooks_dir=stand_ins,
            progress=False,
        )
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["notebook"], r["status"]) for r in summary] == [
        ("00_setup_check", "ok"),
        ("05_troubleshooting_oom", "failed"),
    ]
    assert json.loads((out / "00_setup_check" / "metrics.json").read_text()) == {"max_steps": 5}
    assert (out / "html" / "05_troubleshooting_oom.html").exists()  # the error is visible in the rendering


def test_cli_reports_failure_with_a_non_zero_exit(stand_ins, tmp_path, capsys):
    code = main(
        [
            "--output-dir",
            str(tmp_path / "run"),
            "--notebooks-dir",
            str(stand_ins),
            "--no-progress",
            "--only",
            "05_troubleshooting_oom",
        ]
    )
    assert code == 1
    assert "Course stopped: 05_troubleshooting_oom failed" in capsys.readouterr().err


def test_unknown_profile_or_notebook_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown profile"):
        run_course("13b", tmp_path)
    with pytest.raises(ValueError, match="unknown notebooks"):
        run_course("tiny", tmp_path, only=["07_extra"])


@pytest.mark.parametrize(
    "text, value",
    [
        ("40", 40),
        ("2e-4", 2e-4),
        ("True", True),
        ("Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-2B-Instruct"),
        ("'tiny'", "tiny"),
    ],
)
def test_parameter_values_parse_as_python_literals_or_strings(text, value):
    assert _parse_value(text) == value


def test_a_rerun_into_the_same_folder_keeps_the_other_notebooks_results(stand_ins, tmp_path):
    out = tmp_path / "run"
    run_course(
        "tiny", out, only=["00_setup_check", "03_lora_training"], notebooks_dir=stand_ins, progress=False
    )
    run_course(
        "tiny", out, {"MAX_STEPS": 9}, only=["00_setup_check"], notebooks_dir=stand_ins, progress=False
    )
    summary = json.loads((out / "summary.json").read_text())
    assert [r["notebook"] for r in summary] == ["00_setup_check", "03_lora_training"]
    assert summary[0]["metrics"] == {"max_steps": 9}
    assert "03_lora_training.html" in (out / "index.html").read_text()
    rows = run_course("tiny", out, only=["04_vidore_eval"], notebooks_dir=stand_ins, progress=False)
    assert rows[0]["metrics"]["adapter_seen"] == str(
        out / "03_lora_training" / "adapter"
    )  # 03's, from before


def test_an_unknown_parameter_is_refused_with_the_known_ones(stand_ins, tmp_path, capsys):
    with pytest.raises(
        ValueError, match=r"declares the parameter\(s\) \['MAX_STEP'\]; they declare \['MAX_STEPS'"
    ):
        run_course("tiny", tmp_path, {"MAX_STEP": 3}, only=["00_setup_check"], notebooks_dir=stand_ins)
    code = main(["--output-dir", str(tmp_path), "--notebooks-dir", str(stand_ins), "--only", "07_extra"])
    assert code == 2 and "unknown notebooks ['07_extra']" in capsys.readouterr().err


@pytest.fixture
def with_a_flag(tmp_path):
    folder = tmp_path / "flagged"
    folder.mkdir()
    _notebook(
        folder / "00_setup_check.ipynb",
        'OUTPUT_DIR: str = "."  # where metrics go\nCHECK: bool = True  # True/False\nSTEPS: int = 5  # steps',
        WRITE_METRICS.format(metrics="{'check': CHECK, 'steps': STEPS}"),
    )
    return folder


@pytest.mark.parametrize(
    "text, value",
    [
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("TRUE", True),
        ("1", True),
        ("on", True),
    ],
)
def test_booleans_parse_the_way_people_write_them(with_a_flag, tmp_path, text, value):
    out = tmp_path / "out"
    args = ["--output-dir", str(out), "--notebooks-dir", str(with_a_flag), "--only", "00_setup_check"]
    assert main([*args, "-p", "CHECK", text]) == 0
    assert json.loads((out / "00_setup_check" / "metrics.json").read_text())["check"] is value


def test_a_value_of_the_wrong_kind_is_refused(with_a_flag, tmp_path, capsys):
    for key, value, message in [
        ("CHECK", "maybe", "-p CHECK takes true or false"),
        ("STEPS", "many", "-p STEPS takes a number"),
    ]:
        args = ["--output-dir", str(tmp_path / "out"), "--notebooks-dir", str(with_a_flag), "-p", key, value]
        assert main([*args, "--only", "00_setup_check"]) == 2
        assert message in capsys.readouterr().err


def test_an_output_dir_that_cannot_be_a_folder_is_one_line(stand_ins, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    for out, message in [
        (tmp_path / "file", "is a file; give a folder"),
        (tmp_path / "file" / "sub", "cannot write to --output-dir"),
    ]:
        assert (
            main(["--output-dir", str(out), "--notebooks-dir", str(stand_ins), "--only", "00_setup_check"])
            == 2
        )
        assert message in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"


class _MissedSignal:
    """A kernel socket holding a reply whose arrival signal the event loop missed: a wait that started before
    the reply arrived never wakes (without a limit) or wakes at its limit; a fresh look finds the reply."""

    def __init__(self):
        self.waits = 0

    async def poll(self, timeout_ms=None):
        import asyncio

        self.waits += 1
        if self.waits == 1:
            if timeout_ms is None:
                await asyncio.Event().wait()
            await asyncio.sleep(timeout_ms / 1000)
        return 1


@pytest.mark.parametrize("cell_timeout", [None, 600])
def test_a_missed_message_signal_costs_a_second_not_the_cell_timeout(cell_timeout):
    """The course's kernel client gets a reply whose signal was missed within a second or two; the plain client
    would wait for ever (no cell limit) or for the whole 10-minute limit."""
    import asyncio
    import time

    import zmq.asyncio
    from jupyter_client.channels import AsyncZMQSocketChannel
    from jupyter_client.session import Session

    from colqwen3_lib.course import _kernel_client_class

    reply = {"msg_type": "execute_reply"}
    context = zmq.asyncio.Context()

    def channel(channel_class):
        made = channel_class(context.socket(zmq.DEALER), Session())
        made.socket.close()
        made.socket = _MissedSignal()

        async def receive(**kwargs):
            return reply

        made._recv = receive
        return made

    async def first_message(chan, limit):
        return await asyncio.wait_for(chan.get_msg(timeout=cell_timeout), limit)

    start = time.monotonic()
    assert asyncio.run(first_message(channel(_kernel_client_class().shell_channel_class), 10)) == reply
    assert time.monotonic() - start < 3
    with pytest.raises(asyncio.TimeoutError):  # what the course avoids: the plain channel is still waiting
        asyncio.run(first_message(channel(AsyncZMQSocketChannel), 2))
    context.term()


def test_kernels_use_unix_sockets_unless_the_folder_is_too_deep_for_one(tmp_path):
    import os

    from colqwen3_lib.course import _kernel_manager_class

    if os.name == "nt":
        pytest.skip("Windows has no Unix sockets: kernels use TCP there")
    short = _kernel_manager_class(tmp_path)()
    assert short.transport == "ipc" and short.ip.startswith(str(tmp_path))
    deep = tmp_path / ("d" * 120)
    assert _kernel_manager_class(deep)().transport == "tcp"  # a socket path holds at most 107 bytes


REPO = Path(__file__).resolve().parents[1]
# `make` as a learner types it, even when the tests themselves run under `make test`.
MAKE_ENV = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_make_lab_passes_allow_root_only_to_root():
    shown = subprocess.run(
        ["make", "-n", "-C", str(REPO), "lab", "LAB_ARGS=--no-browser"],
        capture_output=True,
        text=True,
        env=MAKE_ENV,
    )
    assert shown.returncode == 0, shown.stderr
    allow_root = " --allow-root" if os.geteuid() == 0 else ""
    assert f"cd notebooks && ../.venv/bin/jupyter lab{allow_root} --no-browser\n" in shown.stdout


def _stop(group: subprocess.Popen) -> None:
    """Stop a process started in a session of its own and everything it started; return once none is left."""
    deadline = time.monotonic() + 30
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group.pid, sig)
        except ProcessLookupError:
            break
        while time.monotonic() < deadline:
            group.poll()  # collects the leader once it exits
            try:
                os.killpg(group.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        deadline = time.monotonic() + 10
    group.wait()


@pytest.mark.slow
def test_make_lab_serves_the_course_for_root_and_for_others(tmp_path):
    """`make lab` as a learner runs it (root in a container or a cloud notebook, or not): JupyterLab starts and
    answers on its port. It is stopped, with everything it started, whatever happens."""
    if subprocess.run(["make", "-q", "-C", str(REPO), "install"], env=MAKE_ENV).returncode != 0:
        pytest.skip("the kit's .venv is not built or is out of date: `make install` first")
    port, token = _free_port(), "course-test"
    lab_args = (
        f"--no-browser --ip=127.0.0.1 --port={port} --ServerApp.token={token} --ServerApp.open_browser=False"
    )
    env = {**MAKE_ENV, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}  # its server files, not the user's
    log = tmp_path / "lab.log"
    with log.open("w") as output:
        lab = subprocess.Popen(
            ["make", "-C", str(REPO), "lab", f"LAB_ARGS={lab_args}"],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # make, its shell and JupyterLab form one group, stopped together
        )
    try:
        deadline, status = time.monotonic() + 90, None
        while status is None and time.monotonic() < deadline and lab.poll() is None:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/status?token={token}", timeout=5
                ) as reply:
                    status = json.load(reply)
            except OSError:
                time.sleep(0.5)
        assert status is not None, f"`make lab` did not answer on port {port}:\n{log.read_text()[-3000:]}"
        assert "started" in status
    finally:
        _stop(lab)
