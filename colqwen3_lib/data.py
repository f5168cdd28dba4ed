"""Reading datasets: one loader for hub ids, local datasets and the `synthetic` sentinel, one image
decoder, and the training data pipeline.

- `load_split(name, split)`: a `datasets.Dataset` from `vidore/...`, a local folder or `synthetic`.
- `decode_image(value, what)`: a dataset cell (bytes, path or PIL) -> a loaded PIL image, or an error
  that names the dataset and row.
- `PairDataset` (query-page rows, pages decoded lazily), `ContrastiveCollator` (rows -> one flat
  batch of processor outputs) and `EpochShuffler` (an order that depends only on seed and epoch).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Sampler

from .processor import ColQwen3Processor
from .synthetic import SYNTHETIC, SYNTHETIC_TASKS, TRAIN_SET_NAME, synthetic_docs

REQUIRED_COLUMNS = ("query", "image")
HARD_NEGATIVE_COLUMN = "neg_image"


def load_split(name_or_path: str | os.PathLike, split: str, single_as_any_split: bool = True):
    """Load one split of a dataset: a hub id (`vidore/...`), a local directory or file, or `synthetic`.

    `synthetic` means the synthetic `colpali_train_set`; `synthetic_charts_test` and
    `synthetic_documents_test` name the synthetic test tasks. A local dataset saved without splits
    (one `datasets.Dataset`) serves as any split, unless `single_as_any_split` is False.

    Raises:
        ValueError: the dataset does not exist, cannot be read, is empty, or has no such split;
            the message names it and what to do.
    """
    from datasets import DatasetDict, load_dataset, load_from_disk

    name = str(name_or_path)
    if name == SYNTHETIC or name in SYNTHETIC_TASKS:
        name = str(synthetic_docs()[TRAIN_SET_NAME if name == SYNTHETIC else name])
    path = Path(name)
    what = f"dataset {str(name_or_path)!r}"
    hub_id = not path.exists() and name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not path.exists() and not hub_id:
        raise ValueError(
            f"{what} does not exist: no such file or folder, and it is not a hub id (owner/name)"
        )
    try:
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
            loaded = load_from_disk(name)
        else:
            loaded = load_dataset(name)  # data files, or a hub id (needs network, or a populated HF cache)
    except (IndexError, FileNotFoundError) as err:
        raise ValueError(
            f"{what} holds no data ({type(err).__name__}: {err}); point to a dataset with rows"
        ) from err
    except ConnectionError as err:
        raise ValueError(
            f"could not load {what} from the Hugging Face Hub ({err}): it needs network access or a populated "
            "HF cache; or pass the path of a local copy"
        ) from err
    except Exception as err:
        raise ValueError(f"{what} could not be read as a dataset ({type(err).__name__}: {err})") from err
    if not isinstance(loaded, DatasetDict):
        if not single_as_any_split and split != "train":
            raise ValueError(f"{what} has no split {split!r}: it was saved as a single dataset (no splits)")
        rows = loaded
    elif split not in loaded:
        raise ValueError(f"{what} has no split {split!r}; it has {sorted(loaded)}")
    else:
        rows = loaded[split]
    if len(rows) == 0:
        raise ValueError(f"{what} [{split}] is empty (0 rows); point to a dataset with rows")
    return rows


def decode_image(value, what: str, header_only: bool = False) -> Image.Image:
    """A dataset cell (undecoded `datasets.Image` dict, path, bytes or PIL image) -> a PIL image.

    Args:
        value: The cell.
        what: How errors name it (dataset and row).
        header_only: Read only what `Image.size` needs; the pixels are decoded when first used.

    Raises:
        ValueError: the image cannot be decoded; the message starts with `what`.
    """
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and value.get("bytes"):
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            image = Image.open(value["path"])
        elif isinstance(value, str | os.PathLike):
            image = Image.open(value)
        elif isinstance(value, bytes):
            image = Image.open(io.BytesIO(value))
        else:
            raise ValueError(f"got a {type(value).__name__}, not an image")
        if not header_only:
            image.load()
    except Exception as err:
        raise ValueError(f"{what}: the image could not be decoded ({err}); fix or remove that row") from err
    return image


class PairDataset(torch.utils.data.Dataset):
    """Query-page pairs of a Hugging Face dataset; pages are decoded only when a batch is collated.

    Rows whose query is None (the distractor pages of ViDoRe test sets) are skipped. A `neg_image`
    column, when present, gives each query an explicit hard negative.

    Args:
        dataset: A `datasets.Dataset` with `query` and `image` columns (and optionally `neg_image`).
        name: How error messages name it (e.g. `vidore/colpali_train_set [train]`).

    Raises:
        ValueError: a required column is missing, or no row has a query.
    """

    def __init__(self, dataset, name: str):
        from datasets import Image as ImageFeature

        missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"{name} has no {' or '.join(repr(c) for c in missing)} column (it has {dataset.column_names}); "
                f"training needs {list(REQUIRED_COLUMNS)} (and optionally {HARD_NEGATIVE_COLUMN!r}): "
                "rename the columns or pass another --train-dataset / --eval-dataset"
            )
        self.image_columns = [c for c in ("image", HARD_NEGATIVE_COLUMN) if c in dataset.column_names]
        for column in self.image_columns:
            if isinstance(dataset.features[column], ImageFeature):
                dataset = dataset.cast_column(column, ImageFeature(decode=False))
        self.dataset, self.name = dataset, name
        self.rows = [i for i, query in enumerate(dataset["query"]) if query is not None]
        if not self.rows:
            raise ValueError(f"{name} has no row with a query; training needs query-page pairs")

    @property
    def has_hard_negatives(self) -> bool:
        return HARD_NEGATIVE_COLUMN in self.image_columns

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        item = self.dataset[row]
        query = item["query"]
        if not isinstance(query, str) or not query.strip():
            raise ValueError(
                f"{self.name} row {row}: the query is {query!r}; give it some text or remove the row"
            )
        # Pages stay encoded (bytes or a path) until the collator needs them.
        return {"row": row, "source": self.name, "query": query, **{c: item[c] for c in self.image_columns}}


def load_pairs(name: str, split: str, single_as_any_split: bool = True) -> PairDataset:
    """`load_split(name, split)` wrapped as a `PairDataset`."""
    return PairDataset(load_split(name, split, single_as_any_split), f"{name} [{split}]")


class ContrastiveCollator:
    """Rows -> one flat batch: `query_*`, `doc_*` (and `neg_doc_*`) processor outputs.

    Flat keys let `transformers.Trainer` move the batch to the device as it does any batch.

    Args:
        processor: The ColQwen3 processor.
        cache_pages: Keep each processed page (per dataset row) in memory and reuse it in later
            epochs instead of resizing it again. Worth it for small datasets seen many times (the
            tiny run); it holds every page's pixels in memory, so leave it off for real datasets.
    """

    def __init__(self, processor: ColQwen3Processor, cache_pages: bool = False):
        self.processor, self.cache_pages = processor, cache_pages
        self._pages: dict[tuple[str, str, int], dict[str, torch.Tensor]] = {}  # (dataset, column, row) ->

    @staticmethod
    def _decode(rows: list[dict], column: str) -> list[Image.Image]:
        what = "" if column == "image" else f" ({column})"
        return [decode_image(r[column], f"{r['source']} row {r['row']}{what}") for r in rows]

    def _process_pages(self, rows: list[dict], column: str) -> dict[str, torch.Tensor]:
        if not self.cache_pages:
            return dict(self.processor.process_images(self._decode(rows, column)))
        todo = [r for r in rows if (r["source"], column, r["row"]) not in self._pages]
        if todo:
            batch = self.processor.process_images(self._decode(todo, column))
            for i, r in enumerate(todo):
                n_tokens = int(batch["attention_mask"][i].sum())
                n_patches = int(batch["image_grid_thw"][i].prod())
                self._pages[r["source"], column, r["row"]] = {
                    "input_ids": batch["input_ids"][i, -n_tokens:].clone(),
                    "mm_token_type_ids": batch["mm_token_type_ids"][i, -n_tokens:].clone(),
                    "pixel_values": batch["pixel_values"][i, :n_patches].clone(),
                    "image_grid_thw": batch["image_grid_thw"][i].clone(),
                }
        pages = [self._pages[r["source"], column, r["row"]] for r in rows]
        longest = max(p["input_ids"].shape[0] for p in pages)
        pad_id = self.processor.tokenizer.pad_token_id

        def left_pad(t: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (longest - t.shape[0], 0), value=value)

        return {  # the same tensors process_images gives for these pages, left-padded as it pads
            "input_ids": torch.stack([left_pad(p["input_ids"], pad_id) for p in pages]),  # (batch, longest)
            "attention_mask": torch.stack([left_pad(torch.ones_like(p["input_ids"]), 0) for p in pages]),
            "mm_token_type_ids": torch.stack([left_pad(p["mm_token_type_ids"], 0) for p in pages]),
            "pixel_values": torch.nn.utils.rnn.pad_sequence(
                [p["pixel_values"] for p in pages], batch_first=True
            ),
            "image_grid_thw": torch.stack([p["image_grid_thw"] for p in pages]),  # (batch, 3)
        }

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        try:
            parts = {"query_": dict(self.processor.process_queries([r["query"] for r in rows]))}
            parts["doc_"] = self._process_pages(rows, "image")
            if HARD_NEGATIVE_COLUMN in rows[0]:
                parts["neg_doc_"] = self._process_pages(rows, HARD_NEGATIVE_COLUMN)
        except ValueError as err:
            if "could not be decoded" in str(err):  # already names the row
                raise
            raise ValueError(f"{rows[0]['source']}, batch of rows {[r['row'] for r in rows]}: {err}") from err
        return {prefix + key: value for prefix, batch in parts.items() for key, value in batch.items()}


class EpochShuffler(Sampler[int]):
    """A random order that depends only on (seed, epoch): a resumed run sees the same batches."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())
