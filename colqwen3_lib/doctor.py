"""Setup check: is this machine ready to run the kit, and which recommended training settings fit it?

    python -m colqwen3_lib.doctor            # readable report; exit code 1 on a hard failure
    python -m colqwen3_lib.doctor --json     # the same report as JSON

Hard failures (exit code 1): a required package missing or too old, `Qwen3VLModel` not importable,
the offline tiny checkpoint failing to load or run. Everything else (no GPU, no flash-attn, no
network, little disk) is reported as a warning with what to do.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import shutil
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from .reference import LORA_RANK, MAX_VISUAL_TOKENS

OK, WARN, FAIL, INFO = "ok", "warn", "FAIL", "info"
DISTRIBUTION = "colqwen3-lib"
CHECKED_PACKAGES = ("torch", "torchvision", "transformers", "peft", "accelerate", "datasets")
HUB_TIMEOUT_S = 3.0
QWEN3VL_HINT = (
    'pip install "transformers>=4.57.0"; verify with '
    '`python -c "from transformers.models.qwen3_vl import Qwen3VLModel"`'
)


@dataclass
class Check:
    """One line of the report: what was checked, ok / warn / FAIL / info, and the details."""

    name: str
    status: str
    detail: str


@dataclass
class DoctorReport:
    """Everything the doctor found; `ok` is False when a check failed hard."""

    checks: list[Check] = field(default_factory=list)
    verdicts: list[dict] = field(default_factory=list)
    attention: str = ""
    gpu_memory_gib: float | None = None

    @property
    def ok(self) -> bool:
        return not any(c.status == FAIL for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    def check(self, name: str) -> Check:
        """The check called `name` (KeyError if the doctor did not run it)."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}; the report has {[c.name for c in self.checks]}")

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "checks": [asdict(c) for c in self.checks],
            "verdicts": self.verdicts,
            "attention": self.attention,
            "gpu_memory_gib": self.gpu_memory_gib,
        }

    def table(self) -> str:
        """The report as aligned text tables."""
        width = max(len(c.name) for c in self.checks)
        lines = ["ColQwen3 doctor", ""]
        lines += [f"{c.name:<{width}}  {c.status:<4}  {c.detail}" for c in self.checks]
        if self.verdicts:
            where = (
                f"a {self.gpu_memory_gib:.0f} GiB GPU"
                if self.gpu_memory_gib
                else "this machine (no CUDA GPU)"
            )
            lines += ["", verdicts_table(self.verdicts, where, self.attention)]
        lines += [
            "",
            "Result: "
            + ("OK" if self.ok else f"{len(self.failures)} hard failure(s): fix the FAIL lines above"),
        ]
        return "\n".join(lines)


def verdicts_table(verdicts: list[dict], where: str, attention: str = "flash_attention_2") -> str:
    """`oom.recommended_verdicts` rows as a table: does each of the reference's recommended settings fit `where`?"""
    lines = [
        f"Recommended settings on {where}: bf16, LoRA r={LORA_RANK}, {MAX_VISUAL_TOKENS} visual tokens, "
        f"{attention}, gradient checkpointing"
    ]
    header = f"{'model':<6} {'batch':>5} {'needs':>9}  verdict"
    lines += [header, "-" * len(header)]
    for v in verdicts:
        # The detail repeats the verdict's first word when it only spells it out ("fits", "needs ...").
        said = (
            v["detail"]
            if v["detail"].startswith(v["verdict"].split()[0])
            else f"{v['verdict']}: {v['detail']}"
        )
        lines.append(f"{v['model']:<6} {v['batch']:>5} {v['needs_gib']:>5.1f} GiB  {said}")
    return "\n".join(lines)


# ---------------------------------------------------------------- individual checks


def _requirements() -> dict[str, str]:
    """Package name -> version specifier, from the installed kit's metadata (pyproject.toml's ranges)."""
    from packaging.requirements import Requirement

    try:
        lines = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        lines = tomllib.loads(pyproject.read_text())["project"]["dependencies"] if pyproject.exists() else []
    out = {}
    for line in lines:
        req = Requirement(line)
        if req.marker is None:
            out[req.name.lower()] = str(req.specifier)
    return out


def check_python() -> Check:
    from packaging.specifiers import SpecifierSet

    version = platform.python_version()
    try:
        wanted = importlib.metadata.metadata(DISTRIBUTION)["Requires-Python"] or ""
    except importlib.metadata.PackageNotFoundError:
        wanted = ">=3.10"
    if wanted and version not in SpecifierSet(wanted):
        return Check("python", FAIL, f"{version}, the kit needs {wanted}")
    return Check("python", OK, f"{version} ({wanted or 'any'})")


def check_packages() -> list[Check]:
    """Installed versions of the kit's main dependencies against its requirements."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    wanted = _requirements()
    checks = []
    for name in CHECKED_PACKAGES:
        spec = wanted.get(name, "")
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            checks.append(Check(name, FAIL, f"not installed; pip install '{name}{spec}'"))
            continue
        if spec and not SpecifierSet(spec).contains(Version(installed), prereleases=True):
            checks.append(
                Check(name, FAIL, f"{installed}, the kit needs {spec}: pip install -U '{name}{spec}'")
            )
        else:
            checks.append(Check(name, OK, f"{installed} ({spec or 'any'})"))
    return checks


def check_qwen3vl() -> Check:
    """The reference README's check: `from transformers.models.qwen3_vl import Qwen3VLModel`."""
    try:
        module = importlib.import_module("transformers.models.qwen3_vl")
        module.Qwen3VLModel  # noqa: B018 -- the lazy module imports the class on access
    except (ImportError, AttributeError) as err:
        return Check("qwen3_vl", FAIL, f"cannot import Qwen3VLModel ({err}); {QWEN3VL_HINT}")
    return Check("qwen3_vl", OK, "transformers.models.qwen3_vl imports Qwen3VLModel")


def gpu_info() -> list[dict]:
    """Name, memory (GiB), compute capability and bf16 support of each visible CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return []
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append(
            {
                "index": i,
                "name": props.name,
                "memory_gib": props.total_memory / 2**30,
                "capability": f"{props.major}.{props.minor}",
                "bf16": props.major >= 8,
            }
        )
    return devices


def check_accelerator(devices: list[dict]) -> Check:
    import torch

    if not devices:
        cuda = torch.version.cuda or "none"
        return Check("gpu", WARN, f"no CUDA device (torch built with CUDA {cuda}): the tiny model runs on CPU; "
                     "training the real 2B/4B/8B models needs a GPU")  # fmt: skip
    parts = [
        f"cuda:{d['index']} {d['name']}, {d['memory_gib']:.0f} GiB, compute {d['capability']}, "
        f"bf16 {'yes' if d['bf16'] else 'no (use float16 or float32)'}"
        for d in devices
    ]
    status = OK if all(d["bf16"] for d in devices) else WARN
    return Check("gpu", status, "; ".join(parts))


def check_flash_attn(devices: list[dict]) -> Check:
    from .model import FLASH_ATTN_HINT

    if importlib.util.find_spec("flash_attn") is None:
        status = WARN if devices else INFO
        return Check("flash-attn", status, f"not installed ({FLASH_ATTN_HINT})")
    try:
        module = importlib.import_module("flash_attn")
    # A wheel built for another torch or CUDA fails with anything from OSError to RuntimeError.
    except Exception as err:
        return Check(
            "flash-attn", WARN, f"installed but does not import ({err}); reinstall: {FLASH_ATTN_HINT}"
        )
    if devices and not all(float(d["capability"]) >= 8.0 for d in devices):
        return Check("flash-attn", WARN, f"{module.__version__} imports, but needs compute capability >= 8.0")
    return Check("flash-attn", OK, f"{module.__version__}, importable")


def check_attention(devices: list[dict]) -> tuple[Check, str]:
    """Which attention implementation `ColQwen3.from_pretrained` will pick here, and why."""
    from .model import resolve_attn_implementation

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("colqwen3_lib.model")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        chosen = resolve_attn_implementation(None, "cuda" if devices else "cpu")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    why = records[-1].getMessage() if records else f"attention: {chosen}"
    return Check("attention", OK, why.removeprefix("attention: ")), chosen


def checkpoint_bytes(size: str) -> int:
    """Bytes of a Qwen3-VL-Instruct checkpoint on the hub (bf16 weights, lm_head included when untied)."""
    from .architectures import real_config
    from .memory import count_parameters

    config = real_config(size)
    params = count_parameters(config).base
    if not config.text_config.tie_word_embeddings:
        params += config.text_config.vocab_size * config.text_config.hidden_size
    return 2 * params


def check_disk() -> Check:
    """Free space where the hub cache (real checkpoints) lives, against the 2B/4B/8B downloads."""
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    existing = next(p for p in (cache, *cache.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    needs = {size: checkpoint_bytes(size) for size in ("2b", "4b", "8b")}
    fits = [size.upper() for size, n in needs.items() if n * 1.1 < free]
    sizes = ", ".join(f"{s.upper()} {n / 1e9:.1f} GB" for s, n in needs.items())
    detail = f"{free / 1e9:.0f} GB free at {existing} (checkpoints: {sizes})"
    if not fits:
        return Check(
            "disk", WARN, f"{detail}: not enough for any real checkpoint; set HF_HOME to a bigger disk"
        )
    return Check("disk", OK if len(fits) == 3 else WARN, f"{detail}; room for {', '.join(fits)}")


def _tcp_reachable(host: str, port: int, timeout: float) -> str | None:
    """None if a TCP connection opens within `timeout` seconds (DNS included), else why not."""
    result: list[str | None] = []

    def connect():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(None)
        except OSError as err:
            result.append(f"{type(err).__name__}: {err}")

    thread = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(timeout)
    return result[0] if result else f"no answer within {timeout:.0f} s"


def check_hub(timeout: float = HUB_TIMEOUT_S) -> Check:
    """Whether the Hugging Face hub answers (a TCP connection, at most `timeout` seconds)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return Check(
            "hub", INFO, "offline mode (HF_HUB_OFFLINE=1): real checkpoints only from the local cache"
        )
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    error = _tcp_reachable(url.hostname or "huggingface.co", port, timeout)
    if error:
        return Check(
            "hub", WARN, f"{url.hostname} unreachable ({error}); use `tiny`, or a local path / cache"
        )
    return Check("hub", OK, f"{url.hostname}:{port} reachable")


@contextmanager
def _quiet():
    """Silence transformers' and the kit's loading messages and progress bars."""
    from .model import quiet_transformers

    kit = logging.getLogger("colqwen3_lib")
    level = kit.level
    kit.setLevel(logging.ERROR)
    try:
        with quiet_transformers():
            yield
    finally:
        kit.setLevel(level)


def check_tiny() -> Check:
    """Build (or reuse) the offline tiny checkpoint and run one page and one query through it."""
    import torch
    from PIL import Image

    from .model import ColQwen3
    from .processor import ColQwen3Processor

    start = time.perf_counter()
    try:
        with _quiet():  # the random head's "newly initialised" warning is expected here
            processor = ColQwen3Processor.from_pretrained("tiny", max_num_visual_tokens=64)
            model = ColQwen3.from_pretrained(
                "tiny", torch_dtype=torch.float32, attn_implementation="sdpa"
            ).eval()
        with torch.no_grad():
            pages = model(**processor.process_images([Image.new("RGB", (256, 320), "white")]))
            queries = model(**processor.process_queries(["Which page shows a red bar chart?"]))
        scores = processor.score(list(queries), list(pages))
    except Exception as err:
        from .tiny import cache_dir

        return Check(
            "tiny model",
            FAIL,
            f"the offline tiny path failed: {type(err).__name__}: {err}. The kit rebuilds a damaged cache by itself; "
            f"if this persists, delete {cache_dir()} (or point COLQWEN3_CACHE to a writable folder) and run again",
        )
    if not torch.isfinite(scores).all():
        return Check("tiny model", FAIL, f"the tiny model gave non-finite scores {scores.tolist()}")
    return Check(
        "tiny model",
        OK,
        f"offline checkpoint loads; page -> {tuple(pages.shape)}, query -> {tuple(queries.shape)}, "
        f"score {scores.item():.3f} ({time.perf_counter() - start:.1f} s)",
    )


# ---------------------------------------------------------------- the report


def run_doctor(tiny: bool = True, hub_timeout: float = HUB_TIMEOUT_S) -> DoctorReport:
    """Run every check and return the report (`report.table()` prints it; `report.ok` is the verdict).

    Args:
        tiny: Also load and run the offline tiny checkpoint (built on first use, ~10 s).
        hub_timeout: Seconds the hub check may take.
    """
    from .oom import recommended_verdicts

    report = DoctorReport()
    report.checks.append(check_python())
    report.checks += check_packages()
    report.checks.append(check_qwen3vl())
    if any(c.status == FAIL for c in report.checks):
        return report  # the remaining checks import transformers/torch internals: stop with what is wrong
    devices = gpu_info()
    report.checks.append(check_accelerator(devices))
    report.checks.append(check_flash_attn(devices))
    attention, report.attention = check_attention(devices)
    report.checks.append(attention)
    report.checks.append(check_disk())
    report.checks.append(check_hub(hub_timeout))
    if tiny:
        report.checks.append(check_tiny())
    report.gpu_memory_gib = min((d["memory_gib"] for d in devices), default=None)
    report.verdicts = recommended_verdicts(report.gpu_memory_gib, attn_implementation=report.attention)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check this machine's setup for the ColQwen3 kit.")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--skip-tiny", action="store_true", help="do not load and run the tiny checkpoint")
    parser.add_argument("--hub-timeout", type=float, default=HUB_TIMEOUT_S, help="seconds for the hub check")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report = run_doctor(tiny=not args.skip_tiny, hub_timeout=args.hub_timeout)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
