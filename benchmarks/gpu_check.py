"""GPU acceptance check: on this GPU, does the kit learn, fit, score, embed and cache at GPU speed? One run, one report.

    python benchmarks/gpu_check.py                          # on a CUDA GPU: about 6 minutes on an H200
    python benchmarks/gpu_check.py --diagnose               # also 40-step training variants (kernels, dtypes)
    python benchmarks/gpu_check.py --dry-run                # the same logic on the CPU, tiny and quick (tests)

Offline: the tiny checkpoint and synthetic pages, and the published 2B/4B/8B architectures with random weights.
colpali-engine 0.3.18 and late-interaction-kernels join the MaxSim section when importable (`--peer-path` adds
a folder they were installed into with `pip install --no-deps --target`). Sections, in order; each runs even
if one before it failed, and a failure is reported, not raised:

1. machine: the GPU, the versions, the bf16 matrix-product rate.
2. attention: each sdpa kernel's output and query/key/value gradients against a float64 reference, with
   ColQwen3's masks (causal, left padding) at the tiny and the real head sizes.
3. training: the tiny course's run (its defaults: 300 steps of 32 pairs; bf16 on a GPU) with both trainers,
   then NDCG@5 of each adapter on the synthetic test sets (goal: 0.8 or more). With --diagnose, 40-step
   variants first: sdpa without cuDNN's kernel, eager attention, float32, the head in float32.
4. MaxSim: 256 queries of 12-28 tokens against 4,000 pages of 600-768 tokens, 128 dims, bf16, pages already
   on the GPU: `score_multi_vector` against the matrix products alone, colpali-engine and
   late-interaction-kernels (goal: at least 2x colpali-engine with late-interaction-kernels, and half the
   products' rate).
5. gradient cache: 2B LoRA, batch 64, step time without it and with it in chunks of 8 (goal: at most 1.4x),
   and where the time goes.
6. embedding: pages per second of the 2B through `embed_images` against the pipeline before it overlapped
   processing and the model (goal: 2x).
7. memory: the estimator against measured peaks of tiny and the real 2B/4B/8B (goals: within 5%, never
   more than 2% under); also written to benchmarks/memory_accuracy_gpu.md.
8. pytest -m gpu.

It writes a markdown report (default benchmarks/gpu_check.md; --dry-run: --report is required) and, with
--jsonl, one JSON line per measurement as it goes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_memory, bench_embedding

LEARNED_NDCG = 0.8
MAXSIM_VS_PEER = 2.0
MAXSIM_GEMM_SHARE = 0.5
EMBED_GAIN = 2.0
GRAD_CACHE_COST = 1.4
MEMORY_WITHIN = 0.05
MEMORY_UNDER = 0.02


class Check:
    """Collects sections (markdown), measurements (JSON lines) and goals (name, measured text, passed or None)."""

    def __init__(self, args):
        self.args = args
        self.device = "cpu" if args.dry_run else "cuda"
        self.sections: list[str] = []
        self.goals: list[tuple[str, str, bool | None]] = []
        self.jsonl = open(args.jsonl, "a") if args.jsonl else None  # noqa: SIM115

    def record(self, part: str, **values) -> None:
        line = json.dumps({"part": part, **values}, default=str)
        print(line, flush=True)
        if self.jsonl:
            self.jsonl.write(line + "\n")
            self.jsonl.flush()

    def goal(self, name: str, measured: str, passed: bool | None) -> None:
        self.goals.append((name, measured, passed))

    def run(self, title: str, section: Callable[[Check], list[str]]) -> None:
        start = time.perf_counter()
        try:
            lines = section(self)
        except Exception as err:  # a failed section is part of the report
            self.record(title, error=repr(err), traceback=traceback.format_exc())
            lines = [f"**Failed**: `{type(err).__name__}: {err}`"]
        seconds = time.perf_counter() - start
        self.record(title, seconds=round(seconds, 1))
        self.sections.append("\n".join([f"## {title}", "", *lines, "", f"({seconds:.0f} s)", ""]))
        self.write()

    def write(self) -> None:
        mode = "dry run on the CPU (tiny sizes: not a measurement of anything)" if self.args.dry_run else ""
        goals = ["| goal | measured | |", "|---|---|---|"] + [
            f"| {name} | {measured} | {'pass' if ok else 'FAIL' if ok is False else 'not measured'} |"
            for name, measured, ok in self.goals
        ]
        text = "\n".join(
            [
                "# GPU acceptance check",
                "",
                f"`python benchmarks/gpu_check.py{' --diagnose' if self.args.diagnose else ''}` "
                f"on {machine_name(self.device)}, {time.strftime('%Y-%m-%d')}. {mode}",
                "",
                *goals,
                "",
                *self.sections,
            ]
        )
        Path(self.args.report).write_text(text)


def machine_name(device: str) -> str:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device: str, repeats: int) -> tuple[float, list[float], object]:
    """Median seconds of `repeats` calls after one warm-up, all the times, and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, out


# ---------------------------------------------------------------------------------------------- 1. machine


def machine(check: Check) -> list[str]:
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("peft", "accelerate", "datasets", "colpali-engine", "late-interaction-kernels"):
        # Read from the installed metadata, not imported: importing colpali-engine registers its own Qwen3-VL
        # checkpoint renaming in transformers (5.17 has none), which would change how this process saves one.
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    n = 1024 if check.args.dry_run else 8192
    dtype = torch.float32 if check.args.dry_run else torch.bfloat16
    a = torch.randn(n, n, device=check.device, dtype=dtype)
    seconds, _, _ = timed(lambda: a @ a, check.device, 3 if check.args.dry_run else 10)
    rate = 2 * n**3 / seconds / 1e12
    check.record("machine", device=machine_name(check.device), gemm_tflops=round(rate, 1), **versions)
    rows = [f"| {k} | {v} |" for k, v in versions.items()]
    return [
        f"{machine_name(check.device)}; {str(dtype)[6:]} {n}x{n}x{n} matrix product: {rate:.1f} TFLOP/s.",
        "",
        "| package | version |",
        "|---|---|",
        *rows,
    ]


# -------------------------------------------------------------------------------------------- 2. attention


def _left_padded_causal_mask(pads: list[int], seq: int) -> torch.Tensor:
    """(batch, 1, seq, seq) boolean mask as transformers builds it for sdpa: causal, left padding masked."""
    i = torch.arange(seq)
    causal = i[None, :] <= i[:, None]  # (seq, seq)
    return torch.stack([causal & (i[None, :] >= pad) for pad in pads])[:, None]


def attention_case(shape: dict, dtype: torch.dtype, device: str, backend) -> dict:
    """Max relative error of the output and of dq/dk/dv (real tokens only) against float64, as ColQwen3 calls sdpa."""
    from torch.nn.attention import sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, kv_heads, seq, head_dim, pads = (shape[k] for k in ("b", "h", "kv", "seq", "d", "pads"))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, seq, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, seq, head_dim, generator=g, dtype=torch.float64)
    mask = _left_padded_causal_mask(pads, seq)
    real = torch.stack([torch.arange(seq) >= pad for pad in pads])  # (batch, seq)
    grad_out = torch.randn(batch, seq, heads, head_dim, generator=g, dtype=torch.float64)
    grad_out = (
        grad_out * real[:, :, None, None]
    )  # padding rows get no gradient in ColQwen3 (zeroed embeddings)

    class Module:  # what transformers' sdpa function reads from the attention module
        num_key_value_groups = heads // kv_heads
        is_causal = True
        training = True

    def run(q, k, v, mask, go):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out, _ = sdpa_attention_forward(Module(), q, k, v, mask, scaling=head_dim**-0.5)  # (b, seq, h, d)
        out.backward(go)
        return out.detach(), q.grad, k.grad, v.grad

    reference = run(q, k, v, mask, grad_out)
    context = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
    cast = {"device": device, "dtype": dtype}
    try:
        with context:
            got = run(q.to(**cast), k.to(**cast), v.to(**cast), mask.to(device), grad_out.to(**cast))
    except RuntimeError as err:
        return {"error": str(err).splitlines()[0][:80]}
    result = {}
    selections = (
        real[:, :, None, None],
        real[:, None, :, None],
        real[:, None, :, None],
        real[:, None, :, None],
    )
    for name, ref, out, keep in zip(("out", "dq", "dk", "dv"), reference, got, selections):
        out = out.double().cpu()
        keep = keep.expand_as(ref)
        if not torch.isfinite(out[keep]).all():
            result[name] = float("nan")
            continue
        result[name] = float((out[keep] - ref[keep]).abs().max() / ref[keep].abs().max())
    return result


def attention(check: Check) -> list[str]:
    from torch.nn.attention import SDPBackend

    shapes = {
        "tiny page (4 heads on 2 kv, head 16, 52 tokens)": dict(
            b=4, h=4, kv=2, seq=52, d=16, pads=[0, 5, 12, 30]
        ),
        "tiny, 64 tokens": dict(b=4, h=4, kv=2, seq=64, d=16, pads=[0, 5, 12, 30]),
        "2B page (16 heads on 8 kv, head 128, 788 tokens)": dict(
            b=2, h=16, kv=8, seq=788, d=128, pads=[0, 37]
        ),
    }
    if check.args.dry_run:
        shapes = {"tiny, 20 tokens": dict(b=2, h=4, kv=2, seq=20, d=16, pads=[0, 5])}
        backends = {"default": None, "math": SDPBackend.MATH}
        dtypes = [torch.float32]
    else:
        backends = {
            "default": None,
            "cuDNN": SDPBackend.CUDNN_ATTENTION,
            "memory-efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH,
        }
        dtypes = [torch.bfloat16, torch.float32]
    tolerance = {torch.bfloat16: 0.05, torch.float32: 1e-3}
    lines = [
        "Relative error (max |error| / max |reference|, real tokens only) of sdpa as transformers calls it for "
        "ColQwen3 (keys/values repeated to every head, a causal mask with left padding: padding rows see no key), "
        f"against float64. Tolerance: {tolerance[torch.bfloat16]} in bf16, {tolerance[torch.float32]} in float32.",
        "",
        "| shape | dtype | kernel | output | dq | dk | dv | |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    wrong = []
    for shape_name, shape in shapes.items():
        for dtype in dtypes:
            for name, backend in backends.items():
                errors = attention_case(shape, dtype, check.device, backend)
                check.record("attention", shape=shape_name, dtype=str(dtype), kernel=name, **errors)
                if "error" in errors:
                    lines.append(
                        f"| {shape_name} | {str(dtype)[6:]} | {name} | | | | | not run: {errors['error']} |"
                    )
                    continue
                bad = [k for k, e in errors.items() if not e <= tolerance[dtype]]
                if bad:
                    wrong.append(f"{name} {str(dtype)[6:]} {shape_name}: {', '.join(bad)}")
                cells = " | ".join(f"{errors[k]:.1e}" for k in ("out", "dq", "dk", "dv"))
                verdict = "WRONG: " + ", ".join(bad) if bad else "ok"
                lines.append(f"| {shape_name} | {str(dtype)[6:]} | {name} | {cells} | {verdict} |")
    if not check.args.dry_run:
        check.goal("sdpa kernels agree with float64", "; ".join(wrong) or "all within tolerance", None)
    return lines


# --------------------------------------------------------------------------------------------- 3. training


def _ndcg5(model_path: str, adapter: Path, device: str) -> float:
    from colqwen3_lib.evaluation import evaluate_model
    from colqwen3_lib.model import load_model
    from colqwen3_lib.synthetic import SYNTHETIC_TASKS

    model, processor = load_model(model_path, adapter=adapter, device=device)
    results = evaluate_model(model, processor, list(SYNTHETIC_TASKS), show_progress=False)
    return statistics.mean(result["metrics"]["ndcg_at_5"] for result in results.values())


def _fp32_head_patches():
    """A diagnostic: `build_model` with the head in float32, and a forward computing it (and the normalisation)
    in float32 outside autocast."""
    import torch.nn.functional as F

    from colqwen3_lib import model as model_module
    from colqwen3_lib import training

    build = training.build_model

    def build_fp32_head(config):
        model, processor = build(config)
        for name, module in model.named_modules():
            if name.endswith("custom_text_proj"):
                module.float()
        return model, processor

    def forward(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, **kwargs):
        if pixel_values is not None and pixel_values.dim() == 3:
            n_patches = image_grid_thw.prod(dim=1)
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, n_patches.tolist())])
        for key in ("use_cache", "return_dict", "output_hidden_states", "labels"):
            kwargs.pop(key, None)
        hidden = model_module.Qwen3VLModel.forward(
            self, input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
            image_grid_thw=image_grid_thw, use_cache=False, return_dict=True, **kwargs,
        ).last_hidden_state  # fmt: skip
        with torch.autocast(hidden.device.type, enabled=False):
            proj = F.normalize(self.custom_text_proj(hidden.float()), dim=-1)
        return proj * attention_mask.unsqueeze(-1).to(proj.dtype)

    return [(training, "build_model", build_fp32_head), (model_module.ColQwen3, "forward", forward)]


def _diagnose_variants(check: Check) -> list[str]:
    """40 steps of the tiny defaults per variant: which change makes a run learn on this GPU?"""
    from accelerate.state import AcceleratorState
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from colqwen3_lib import losses, training
    from colqwen3_lib.config import default_config

    steps = 4 if check.args.dry_run else 40

    def without_cudnn():
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    # name: (settings, patches, context the run goes in)
    variants = {
        "kit (sdpa, torch's choice of kernel)": ({}, [], contextlib.nullcontext),
        "sdpa without cuDNN's kernel": ({}, [], without_cudnn),
        "eager attention": ({"attn_implementation": "eager"}, [], contextlib.nullcontext),
        "float32": ({"bf16": False}, [], contextlib.nullcontext),
        "head and normalisation in float32": ({}, _fp32_head_patches(), contextlib.nullcontext),
    }
    lines = [
        f"{steps} steps of the tiny defaults (torch loop, {'bf16' if check.device == 'cuda' else 'float32'} unless "
        f"said), the loss every {max(1, steps // 4)} steps, and the smallest in-batch score spread (after the "
        f"temperature) after step {min(10, steps // 2)}: near 0, every page scores alike (collapsed).",
        "",
        "| variant | losses | smallest spread | seconds |",
        "|---|---|---:|---:|",
    ]
    for name, (overrides, patches, context) in variants.items():
        spreads = []
        saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
        original_update = losses.CollapseGuard.update

        def update(self, step, spread, *rest, original=original_update, spreads=spreads):
            spreads.append((step, spread))
            return original(self, step, spread, *rest)

        AcceleratorState._reset_state(reset_partial_state=True)  # each variant may set its own precision
        try:
            losses.CollapseGuard.update = update
            for owner, attr, value in patches:
                setattr(owner, attr, value)
            with tempfile.TemporaryDirectory() as out:
                config = default_config(
                    out, "tiny", peft=True, trainer="torch", max_steps=steps, logging_steps=max(1, steps // 4),
                    eval_dataset="none", collapse_patience=0, save_steps=10_000, **overrides,
                )  # fmt: skip
                start = time.perf_counter()
                with context():
                    result = training.train(config)
                seconds = time.perf_counter() - start
        except Exception as err:
            check.record("diagnose", variant=name, error=repr(err))
            lines.append(f"| {name} | failed: {type(err).__name__}: {err} | | |")
            continue
        finally:
            losses.CollapseGuard.update = original_update
            for owner, attr, value in saved:
                setattr(owner, attr, value)
        logged = [round(e["loss"], 3) for e in result.metrics["train"]]
        smallest = min((s for step, s in spreads if step > min(10, steps // 2)), default=float("nan"))
        check.record(
            "diagnose", variant=name, losses=logged, smallest_spread=smallest, seconds=round(seconds, 1)
        )
        lines.append(f"| {name} | {' / '.join(map(str, logged))} | {smallest:.3g} | {seconds:.1f} |")
    return lines + [""]


def train_section(check: Check) -> list[str]:
    from accelerate.state import AcceleratorState

    from colqwen3_lib import training
    from colqwen3_lib.config import default_config

    lines = _diagnose_variants(check) if check.args.diagnose else []
    small = (
        dict(max_steps=4, per_device_train_batch_size=8, max_visual_tokens=16) if check.args.dry_run else {}
    )
    lines += [
        "The tiny course's training (`python -m colqwen3_lib.train --base-model-path tiny --peft`, its defaults"
        + (", shrunk to 4 steps of 8 pairs in a dry run" if check.args.dry_run else "")
        + "), then NDCG@5 of the adapter on the synthetic test sets (mteb protocol, mean of the tasks).",
        "",
        "| trainer | seed | dtype | steps | seconds | first / last logged loss | NDCG@5 |",
        "|---|---:|---|---:|---:|---|---:|",
    ]
    for seed, trainer in [(seed, trainer) for seed in check.args.seeds for trainer in ("torch", "hf")]:
        AcceleratorState._reset_state(reset_partial_state=True)  # the default precision, whatever ran before
        with tempfile.TemporaryDirectory() as out:
            config = default_config(Path(out) / "run", "tiny", peft=True, trainer=trainer, seed=seed, **small)
            result = training.train(config)
            summary, logged = result.metrics["summary"], result.metrics["train"]
            ndcg = _ndcg5("tiny", Path(config.output_dir), check.device)
        dtype = "bfloat16" if config.bf16_enabled else "float32"
        check.record("training", trainer=trainer, seed=seed, dtype=dtype, ndcg_at_5=ndcg, **summary)
        lines.append(
            f"| {trainer} | {seed} | {dtype} | {summary['global_step']} | {summary['train_seconds']:.1f} | "
            f"{logged[0]['loss']:.3f} / {logged[-1]['loss']:.3f} | {ndcg:.3f} |"
        )
        if not check.args.dry_run:
            check.goal(
                f"the tiny run learns ({trainer} trainer, {dtype})",
                f"NDCG@5 {ndcg:.3f}",
                ndcg >= LEARNED_NDCG,
            )
    return lines


# ----------------------------------------------------------------------------------------------- 4. MaxSim


def _peer_scorers(device: str) -> dict[str, Callable]:
    """colpali-engine's scorer without and with late-interaction-kernels, and the latter's packed kernel alone."""
    scorers = {}
    try:
        from colpali_engine.utils.processing_utils import BaseVisualRetrieverProcessor
    except ImportError:
        return scorers
    import os

    def colpali(backend: str):
        def score(qs, ps):
            os.environ["COLPALI_SCORES_BACKEND"] = backend
            try:
                return BaseVisualRetrieverProcessor.score_multi_vector(qs, ps, device=device)
            finally:
                del os.environ["COLPALI_SCORES_BACKEND"]

        return score

    scorers["colpali-engine 0.3.18 (einsum)"] = colpali("torch")
    if device == "cuda" and importlib.util.find_spec("late_interaction_kernels"):
        scorers["colpali-engine 0.3.18 + late-interaction-kernels"] = colpali("lik")
    return scorers


def _lik_packed(qs, ps) -> torch.Tensor:
    """late-interaction-kernels' own kernel on packed (unpadded) inputs, packing included."""
    from late_interaction_kernels import maxsim_varlen

    def packed(items):
        lengths = torch.tensor([0] + [len(t) for t in items], device=items[0].device)
        return torch.cat(items), lengths.cumsum(0).to(torch.int32), max(len(t) for t in items)

    (q, cu_q, max_q), (p, cu_p, max_p) = packed(qs), packed(ps)
    return maxsim_varlen(q, p, cu_q, cu_p, max_q, max_p).cpu()


def maxsim(check: Check) -> list[str]:
    from colqwen3_lib.scoring import score_multi_vector, score_multi_vector_reference

    n_q, n_p = (16, 40) if check.args.dry_run else (256, 4000)
    dtype = torch.float32 if check.args.dry_run else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    q_lengths = torch.randint(12, 29, (n_q,), generator=g).tolist()
    p_lengths = torch.randint(600, 769, (n_p,), generator=g).tolist()

    def unit(n):
        return torch.nn.functional.normalize(torch.randn(n, 128, generator=g), dim=-1).to(check.device, dtype)

    queries, pages = [unit(n) for n in q_lengths], [unit(n) for n in p_lengths]
    flop = 2 * sum(q_lengths) * sum(p_lengths) * 128
    q_all = torch.cat(queries).T.contiguous()
    blocks = [torch.cat(pages[i : i + 64]) for i in range(0, n_p, 64)]

    def gemm():
        for block in blocks:
            block @ q_all

    repeats = 2 if check.args.dry_run else 5
    contenders = {
        "matrix products alone": gemm,
        "kit score_multi_vector": lambda: score_multi_vector(queries, pages),
    }
    for cap in (64, 256, 2048):
        contenders[f"kit, {cap} MiB blocks"] = lambda c=cap: score_multi_vector(
            queries, pages, max_chunk_bytes=c * 2**20
        )
    contenders.update(
        {name: lambda f=f: f(queries, pages) for name, f in _peer_scorers(check.device).items()}
    )
    if check.device == "cuda" and importlib.util.find_spec("late_interaction_kernels"):
        contenders["late-interaction-kernels maxsim_varlen (packed)"] = lambda: _lik_packed(queries, pages)
    medians, outputs = {}, {}
    for name, fn in contenders.items():
        try:
            medians[name], times, outputs[name] = timed(fn, check.device, repeats)
        except Exception as err:
            check.record("maxsim", contender=name, error=repr(err))
            continue
        check.record(
            "maxsim", contender=name, median_ms=medians[name] * 1e3, runs_ms=[t * 1e3 for t in times]
        )
    exact = score_multi_vector_reference(
        [q.double().cpu() for q in queries[:8]], [p.double().cpu() for p in pages[:50]]
    )
    kit = outputs["kit score_multi_vector"]
    error = float((kit[:8, :50] - exact).abs().max())
    lines = [
        f"{n_q} queries ({min(q_lengths)}-{max(q_lengths)} tokens) x {n_p} pages ({min(p_lengths)}-{max(p_lengths)} "
        f"tokens), 128 dims, {str(dtype)[6:]}, lists of tensors on the {check.device.upper()}; {flop / 1e12:.2f} "
        f"TFLOP; median of {repeats} after a warm-up. The kit's scores against float64 (8 x 50): max |error| "
        f"{error:.2e}.",
        "",
        "| scorer | ms | TFLOP/s | vs kit | max abs diff to kit |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, seconds in medians.items():
        diff = outputs.get(name)
        diff = f"{float((diff - kit).abs().max()):.2e}" if isinstance(diff, torch.Tensor) else ""
        lines.append(
            f"| {name} | {seconds * 1e3:.1f} | {flop / seconds / 1e12:.1f} | "
            f"{seconds / medians['kit score_multi_vector']:.2f}x | {diff} |"
        )
    if not check.args.dry_run:
        kit_s = medians["kit score_multi_vector"]
        share = medians["matrix products alone"] / kit_s
        check.goal(
            "MaxSim at half the matrix-product rate or more", f"{share:.0%}", share >= MAXSIM_GEMM_SHARE
        )
        peer = "colpali-engine 0.3.18 + late-interaction-kernels"
        if peer in medians:
            gain = medians[peer] / kit_s
            check.goal(
                "MaxSim 2x colpali-engine + late-interaction-kernels", f"{gain:.2f}x", gain >= MAXSIM_VS_PEER
            )
        else:
            check.goal("MaxSim 2x colpali-engine + late-interaction-kernels", "peer not importable", None)
    return lines


# -------------------------------------------------------------------------------------------- 5. embedding


def embedding(check: Check) -> list[str]:
    from bench_embedding import PIPELINES, load, pages

    from colqwen3_lib.processor import ColQwen3Processor

    name, n, dtype = ("tiny", 8, torch.float32) if check.args.dry_run else ("2b", 64, torch.bfloat16)
    processor = ColQwen3Processor.from_pretrained(
        "tiny", max_num_visual_tokens=768
    )  # the real models' processor
    images = pages(n)
    model = load(name, "sdpa", dtype, check.device)
    lines = [
        f"The {name} architecture ({'random weights, ' if name != 'tiny' else ''}{str(dtype)[6:]}, sdpa), {n} pages of "
        "five common sizes (A4 scan, slide, receipt, screenshot, figure) capped at 768 visual tokens; median of 2.",
        "",
        "| batch | " + " | ".join(f"{p} pages/s" for p in PIPELINES) + " | embed_images vs sorted, in turn |",
        "|---:|" + "---:|" * (len(PIPELINES) + 1),
    ]
    for batch in (4, 16) if check.args.dry_run else (16,):
        rates = {}
        for label, pipeline in PIPELINES.items():
            seconds, _, _ = timed(lambda p=pipeline, b=batch: p(model, processor, images, b), check.device, 2)
            rates[label] = n / seconds
        gain = rates["embed_images"] / rates["sorted, in turn"]
        check.record(
            "embedding", model=name, batch=batch, gain=gain, **{f"{k} pages/s": v for k, v in rates.items()}
        )
        lines.append(f"| {batch} | " + " | ".join(f"{r:.1f}" for r in rates.values()) + f" | {gain:.2f}x |")
        if not check.args.dry_run and batch == 16:
            check.goal("embedding 2x the previous pipeline (batch 16)", f"{gain:.2f}x", gain >= EMBED_GAIN)
    return lines


# ------------------------------------------------------------------------------------- 6. gradient cache


def _cache_parts(model, inputs: dict, chunk: int, device: str) -> dict[str, float]:
    """Seconds of each part of a gradient-cache step: the graph-free passes (and the vision tower's share of the
    pages' one), then the re-runs with backward."""
    from colqwen3_lib.grad_cache import chunk_rows, split_rows
    from colqwen3_lib.losses import sub_batch

    query_chunks = split_rows(sub_batch(inputs, "query_"), chunk_rows(inputs, "query_", chunk))
    page_chunks = split_rows(sub_batch(inputs, "doc_"), chunk)
    visual = next(m for n, m in model.named_modules() if n.endswith("visual"))
    dtype = next(visual.parameters()).dtype
    pixels = [
        (torch.cat([pv[:n] for pv, n in zip(c["pixel_values"], c["image_grid_thw"].prod(1).tolist())]), c["image_grid_thw"])
        for c in page_chunks
    ]  # fmt: skip

    def rerun(chunks):
        for c in chunks:
            out = model(**c)
            (out * torch.ones_like(out)).sum().backward()
        model.zero_grad(set_to_none=True)

    parts = {}
    with torch.no_grad():
        parts["queries, no graph"] = timed(lambda: [model(**c) for c in query_chunks], device, 2)[0]
        parts["pages, no graph"] = timed(lambda: [model(**c) for c in page_chunks], device, 2)[0]
        parts["their vision tower alone"] = timed(
            lambda: [visual(p.to(dtype), grid_thw=g) for p, g in pixels], device, 2
        )[0]
    parts["queries again, with backward"] = timed(lambda: rerun(query_chunks), device, 2)[0]
    parts["pages again, with backward"] = timed(lambda: rerun(page_chunks), device, 2)[0]
    return parts


def _step_times(setup, chunk: int, device: str, plain: bool) -> dict[str, float]:
    """Median seconds of a training step with the gradient cache (`cache`), and with `plain` also without it
    (`plain`) and of each part of the cache's step (`_cache_parts`)."""
    from colqwen3_lib.grad_cache import grad_cache_step
    from colqwen3_lib.losses import ColbertContrastiveLoss
    from colqwen3_lib.measure import build_training_model, synthetic_batch

    torch.manual_seed(0)
    model = build_training_model(setup, device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    pages, queries = synthetic_batch(
        model.config, setup.batch_size, setup.max_visual_tokens, setup.query_len, device
    )
    inputs = {**{f"query_{k}": v for k, v in queries.items()}, **{f"doc_{k}": v for k, v in pages.items()}}
    loss_fn = ColbertContrastiveLoss()

    def step(cache: bool):
        if cache:
            grad_cache_step(model, inputs, loss_fn, chunk)
        else:
            loss_fn(model(**queries), model(**pages)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = {"cache": timed(lambda: step(True), device, 2)[0]}
    if plain:
        times["plain"] = timed(lambda: step(False), device, 2)[0]
        times.update(_cache_parts(model, inputs, chunk, device))
    return times


def grad_cache_section(check: Check) -> list[str]:
    """Step times without and with the cache, and the time of each of its parts."""
    from colqwen3_lib.memory import TrainingSetup

    size, batch, tokens, chunk, dtype = (
        ("tiny", 8, 64, 2, "float32") if check.args.dry_run else ("2b", 64, 768, 8, "bfloat16")
    )
    lines = [
        f"{size}, LoRA, {dtype}, sdpa, batch {batch} of {tokens}-token pages, chunks of {chunk}: median of 2 steps "
        "(forward, backward, AdamW) after a warm-up.",
        "",
        "| setting | seconds per step | vs plain step with checkpointing |",
        "|---|---:|---:|",
    ]
    times, parts = {}, {}
    for checkpointing in (True,) if check.args.dry_run else (True, False):
        setup = TrainingSetup(
            model_size=size, dtype=dtype, lora=True, batch_size=batch, max_visual_tokens=tokens,
            gradient_checkpointing=checkpointing, attn_implementation="sdpa", device=check.device,
        )  # fmt: skip
        label = "with checkpointing" if checkpointing else "without checkpointing"
        measured = _step_times(setup, chunk, check.device, plain=checkpointing)
        times[f"cache, {label}"] = measured.pop("cache")
        if checkpointing:
            times[f"plain, {label}"] = measured.pop("plain")
            parts = measured
            check.record("grad_cache_parts", **{k: round(v, 4) for k, v in parts.items()})
        if check.device == "cuda":
            torch.cuda.empty_cache()
    base = times["plain, with checkpointing"]
    lines += [f"| {name} | {seconds:.3f} | {seconds / base:.2f}x |" for name, seconds in times.items()]
    check.record("grad_cache", **times)
    best = min(v for k, v in times.items() if k.startswith("cache"))
    lines += [
        "",
        "Parts of the cache's step with checkpointing (seconds): "
        + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()),
    ]
    if not check.args.dry_run:
        cost = times["cache, with checkpointing"] / base
        check.goal(
            "gradient cache at most 1.4x the plain step (same batch, checkpointing)",
            f"{cost:.2f}x",
            cost <= GRAD_CACHE_COST,
        )
        check.goal(
            "fastest cache setting vs the plain step", f"{best / base:.2f}x", best / base <= GRAD_CACHE_COST
        )
    return lines


# ----------------------------------------------------------------------------------------------- 7. memory


def memory(check: Check) -> list[str]:
    import bench_memory

    from colqwen3_lib.memory import TrainingSetup

    def setup(size, batch, tokens=768, lora=True, ckpt=True, chunk=None):
        return TrainingSetup(
            model_size=size, dtype="float32" if check.args.dry_run else "bfloat16", lora=lora,
            gradient_checkpointing=ckpt, batch_size=batch, max_visual_tokens=tokens, attn_implementation="sdpa",
            device=check.device, grad_cache_chunk_size=chunk,
        )  # fmt: skip

    if check.args.dry_run:
        cases = [("tiny", None, setup("tiny", 2, 64))]
    else:
        cases = [
            ("tiny", None, setup("tiny", 8, 256)),
            ("2b", None, setup("2b", 16)),
            ("2b", None, setup("2b", 64)),
            ("2b", None, setup("2b", 64, chunk=8)),
            ("2b", None, setup("2b", 16, ckpt=False)),
            ("2b", None, setup("2b", 8, lora=False)),
            ("4b", None, setup("4b", 32)),
            ("8b", None, setup("8b", 16)),
        ]
    rows = bench_memory.run(cases, steps=3)
    for row in rows:
        check.record("memory", **row)
    ratios = [r["ratio"] for r in rows]
    if not check.args.dry_run:
        device = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
        text = bench_memory.markdown(rows, device, steps=3).replace(
            "Generated by `python benchmarks/bench_memory.py`",
            "Generated by `python benchmarks/gpu_check.py`",
        )
        (HERE / "memory_accuracy_gpu.md").write_text(text)
        within = all(abs(x - 1) <= MEMORY_WITHIN for x in ratios)
        check.goal("memory estimate within 5% on every row", f"{min(ratios):.3f}-{max(ratios):.3f}", within)
        check.goal(
            "memory estimate never more than 2% under",
            f"lowest {min(ratios):.3f}",
            min(ratios) >= 1 - MEMORY_UNDER,
        )
    lines = [
        "Predicted (`estimate_memory`) against measured (`torch.cuda.max_memory_allocated`) peaks of a training "
        "step, random weights; step time of the step before the measured one.",
        "",
        "| model | mode | batch | visual tokens | predicted MiB | measured MiB | predicted/measured | step s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['model']} | {r['mode']} | {r['batch']} | {r['tokens']} | {r['predicted']:.0f} | {r['measured']:.0f} | "
        f"{r['ratio']:.3f} | {r['step_seconds']:.2f} |"
        for r in rows
    ]
    return lines


# ------------------------------------------------------------------------------------------------ 8. pytest


def pytest_gpu(check: Check) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "gpu",
        "-p",
        "no:cacheprovider",
        str(HERE.parent / "tests" / "test_gpu.py"),
    ]
    if check.args.dry_run:
        command.append("--collect-only")
    done = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent, timeout=600)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr.strip()[-300:]
    check.record("pytest_gpu", returncode=done.returncode, tail=tail, output=done.stdout[-4000:])
    if not check.args.dry_run:
        check.goal("pytest -m gpu", tail, done.returncode == 0)
    return [f"`{' '.join(command[1:])}`: {tail}", "", "```", done.stdout[-3000:].strip(), "```"]


SECTIONS = {  # the order they run in: what the report cannot do without first
    "machine": machine,
    "attention": attention,
    "training": train_section,
    "MaxSim": maxsim,
    "gradient cache": grad_cache_section,
    "embedding": embedding,
    "memory": memory,
    "pytest -m gpu": pytest_gpu,
}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same logic on the CPU, tiny and quick")
    parser.add_argument("--diagnose", action="store_true", help="also 40-step training variants")
    parser.add_argument("--report", type=Path, help="markdown report (default: benchmarks/gpu_check.md)")
    parser.add_argument("--jsonl", type=Path, help="append one JSON line per measurement here")
    parser.add_argument("--only", nargs="+", choices=sorted(SECTIONS), help="run these sections only")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of the tiny training runs")
    parser.add_argument(
        "--peer-path", help="folder colpali-engine (and late-interaction-kernels) were installed into"
    )
    args = parser.parse_args(argv)
    if args.dry_run and args.report is None:
        parser.error("--dry-run needs --report: its numbers are no GPU's and must not replace gpu_check.md")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible; --dry-run runs the same logic on the CPU")
    args.report = args.report or HERE / "gpu_check.md"
    if args.peer_path:
        sys.path.insert(0, args.peer_path)
    check = Check(args)
    for title, section in SECTIONS.items():
        if args.only and title not in args.only:
            continue
        check.run(title, section)
    return args.report


if __name__ == "__main__":
    main()
