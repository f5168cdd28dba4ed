"""Reading datasets (`load_split`, the `synthetic` sentinel) and the training data pipeline: query-page
pairs, the collator (with its page cache), errors that name the row, and the epoch order."""

import io
from pathlib import Path

import pytest
import torch

from colqwen3_lib import ColQwen3Processor
from colqwen3_lib.data import ContrastiveCollator, EpochShuffler, load_pairs, load_split
from colqwen3_lib.training import train

# ---------------------------------------------------------------------------------------- load_split


def test_the_synthetic_sentinel_loads_the_synthetic_train_set(synthetic):
    assert (
        load_split("synthetic", "train").num_rows
        == load_split(synthetic["colpali_train_set"], "train").num_rows
    )


def test_missing_split_lists_the_ones_that_exist(synthetic):
    with pytest.raises(ValueError, match=r"no split 'validation'; it has \['test', 'train'\]"):
        load_split(synthetic["colpali_train_set"], "validation")


# ------------------------------------------------------------------------------------------ pipeline


def test_cached_collation_equals_the_processor(synthetic):
    pairs = load_pairs("synthetic", "train")
    processor = ColQwen3Processor.from_pretrained("tiny", max_num_visual_tokens=16)
    cached = ContrastiveCollator(processor, cache_pages=True)
    plain = ContrastiveCollator(processor)
    for rows in ([0, 1, 2, 3], [2, 5, 0, 7]):  # the second batch reuses cached pages next to new ones
        batch = [pairs[i] for i in rows]
        got, expected = cached(batch), plain(batch)
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], msg=key)


def _write_dataset(path: Path, images: list, queries: list, columns=("query", "image")) -> str:
    from datasets import Dataset, DatasetDict, Features, Image, Value

    rows = {"query": queries, "image": images}
    features = Features({"query": Value("string"), "image": Image()})
    split = Dataset.from_dict(
        {k: rows[k] for k in columns}, features=Features({k: features[k] for k in columns})
    )
    DatasetDict(train=split).save_to_disk(str(path))
    return str(path)


def _png(colour) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(out, format="PNG")
    return out.getvalue()


def test_a_missing_column_says_what_to_change(tmp_path, small_config):
    path = _write_dataset(
        tmp_path / "d", [{"bytes": _png("red"), "path": None}] * 2, ["a", "b"], columns=("image",)
    )
    with pytest.raises(
        ValueError, match=r"no 'query' column.*rename the columns or pass another --train-dataset"
    ):
        train(small_config(tmp_path / "out", train_dataset=path))


def test_an_unreadable_image_names_its_row(tmp_path, small_config):
    images = [{"bytes": _png(c), "path": None} for c in ("red", "blue", "green", "navy")]
    images[2] = {"bytes": b"not an image at all", "path": None}
    path = _write_dataset(tmp_path / "d", images, ["red page", "blue page", "green page", "navy page"])
    config = small_config(tmp_path / "out", train_dataset=path, per_device_train_batch_size=4, max_steps=1)
    with pytest.raises(ValueError, match=r"row 2: the image could not be decoded .*fix or remove that row"):
        train(config)


def test_the_epoch_order_depends_only_on_seed_and_epoch():
    """What lets a resumed run see the batches an uninterrupted one would have."""

    def order(seed, epoch):
        sampler = EpochShuffler(16, seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert sorted(order(0, 0)) == list(range(16))
    assert order(0, 3) == order(0, 3)
    assert order(0, 3) != order(0, 4) and order(0, 3) != order(1, 3)


def test_an_empty_parquet_file_is_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"query": pa.array([], pa.string())}), file)
    with pytest.raises(ValueError, match=r"dataset '.*pairs\.parquet' holds no data"):
        load_split(file, "train")


def test_a_path_that_does_not_exist_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(ValueError, match="does not exist: no such file or folder, and it is not a hub id"):
        load_split(tmp_path / "typo", "train")
