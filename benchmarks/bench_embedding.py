"""Page embedding throughput: pages per second through the processor and `ColQwen3`, as the evaluation batches them.

    python benchmarks/bench_embedding.py                      # tiny checkpoint (768 tokens) and the 2B architecture
    python benchmarks/bench_embedding.py --models tiny        # quicker
    python benchmarks/bench_embedding.py --device cuda --dtype bfloat16 --attn sdpa flash_attention_2 --models 2b

Pages come in the sizes users meet (A4 scans, slides, receipts, screenshots, small figures), so under a
visual-token cap they become sequences of very different lengths. Three pipelines run in alternation
(medians reported):
- `given order`: pages in their given order, each batch processed on the CPU, then embedded;
- `sorted, in turn`: sorted by size (a batch carries little padding), each batch processed on the CPU
  and then embedded, one after the other (the kit's pipeline before it overlapped the two);
- `embed_images`: `colqwen3_lib.evaluation.embed_images` as it runs now: sorted by size and, on a GPU,
  the next batches decoded and processed in a worker thread while the model embeds, their images resized
  on the GPU.
The 2B model is the published architecture with random weights (no download): the time is the real one.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from colqwen3_lib.evaluation import embed_images
from colqwen3_lib.model import ColQwen3, embed_batch, random_model
from colqwen3_lib.processor import ColQwen3Processor
from colqwen3_lib.synthetic import COLOURS, KINDS, render_page

# (width, height) of common pages: A4 at 150 dpi, a slide, a receipt, a screenshot, a small figure.
PAGE_SIZES = [(1240, 1754), (1920, 1080), (600, 2000), (1280, 800), (480, 360)]


def pages(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        page = render_page(
            rng.choice(KINDS), rng.choice(list(COLOURS)), rng.choice(("portrait", "landscape")), rng
        )
        out.append(page.resize(PAGE_SIZES[i % len(PAGE_SIZES)]))
    rng.shuffle(out)
    return out


@torch.inference_mode()
def in_given_order(model, processor, images, batch_size: int) -> list[torch.Tensor]:
    embeddings = []
    for start in range(0, len(images), batch_size):
        embeddings += embed_batch(model, processor.process_images(images[start : start + batch_size]))
    return embeddings


@torch.inference_mode()
def sorted_in_turn(model, processor, images, batch_size: int) -> list[torch.Tensor]:
    order = sorted(range(len(images)), key=lambda i: images[i].width * images[i].height)
    embeddings = [None] * len(images)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, e in zip(chunk, embed_batch(model, processor.process_images([images[i] for i in chunk]))):
            embeddings[i] = e
    return embeddings


PIPELINES = {"given order": in_given_order, "sorted, in turn": sorted_in_turn, "embed_images": embed_images}


def load(name: str, attn: str, dtype: torch.dtype, device: str):
    if name == "tiny":
        model = ColQwen3.from_pretrained("tiny", dtype=dtype, attn_implementation=attn, device_map=device)
    else:
        model = random_model(name, dtype=dtype, device=device)
        model.config._attn_implementation = attn
        model.config.text_config._attn_implementation = attn
        model.config.vision_config._attn_implementation = attn
    return model.eval()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "2b"])
    parser.add_argument("--pages", type=int, help="default: 40 (tiny), 5 (real sizes on a CPU), 64 on a GPU")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-visual-tokens", type=int, default=768)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--attn", nargs="+", default=["sdpa"], help="attention implementations to compare")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    processor = ColQwen3Processor.from_pretrained("tiny", max_num_visual_tokens=args.max_visual_tokens)
    rows = []
    for name in args.models:
        n = args.pages or (40 if name == "tiny" else 64 if args.device.startswith("cuda") else 5)
        images = pages(n)
        tokens = [int(m.sum()) for m in processor.process_images(images)["attention_mask"]]
        for attn in args.attn:
            model = load(name, attn, dtype, args.device)
            embed_images(model, processor, images[: args.batch_size], args.batch_size)  # warm-up
            times = {label: [] for label in PIPELINES}
            for _ in range(args.repeats):
                for label, fn in PIPELINES.items():
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    fn(model, processor, images, args.batch_size)
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    times[label].append(time.perf_counter() - start)
            medians = {label: statistics.median(t) for label, t in times.items()}
            row = {
                "model": name,
                "attn": attn,
                "pages": n,
                "tokens": f"{min(tokens)}-{max(tokens)}",
                **{f"{label} pages/s": n / s for label, s in medians.items()},
                "gain": medians["sorted, in turn"] / medians["embed_images"],
            }
            rows.append(row)
            rates = ", ".join(f"{label} {row[f'{label} pages/s']:.2f}" for label in PIPELINES)
            print(
                f"{name:<5} {attn:<17} {args.dtype} {args.device}: {n} pages of {row['tokens']} tokens, batch "
                f"{args.batch_size}, pages/s: {rates} (embed_images {row['gain']:.2f}x sorted, in turn)",
                flush=True,
            )
            del model
    return rows


if __name__ == "__main__":
    main()
