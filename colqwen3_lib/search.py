"""A multi-vector index of pages: add embedded pages, save it, load it back, search it by MaxSim.

Every page keeps all its token vectors (or its pooled vectors, `pooling.py`): the vectors of all pages
lie end to end in one (n_vectors, dim) tensor, and `offsets` says where each page starts. On disk an
index is a folder of two files: `vectors-<hash>.safetensors` (the tensor and the offsets, named by the
start of its SHA-256) and `index.json` (one metadata record per page, e.g. the PDF and page number,
free-form `info` such as the model that embedded the pages, and the vectors file's name and hash).
Saving over an index is atomic: the new vectors go beside the old ones, `index.json` is replaced in
one step, then the old vectors are removed, so a crash leaves the old index or the new one, whole. Searching scores the queries against every page with `score_multi_vector`:
exact, brute-force MaxSim, fine up to some hundred thousand pages on one machine.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .files import usual_mode, write_json
from .scoring import score_multi_vector

INDEX_FORMAT = "colqwen3-multi-vector-index"
INDEX_VERSION = 2  # 1: vectors.safetensors, no hash (still read)
LEGACY_VECTORS_FILE = "vectors.safetensors"
PAGES_FILE = "index.json"
RESULT_FIELDS = ("rank", "index", "score")  # what `search` adds to each page's metadata
DTYPE = torch.float16  # half the bytes of float32; MaxSim on a CPU is computed in float32 anyway


class MultiVectorIndex:
    """Pages as multi-vector embeddings, with their metadata, searchable by MaxSim.

    Args:
        dim: Embedding size (128 for the kit's checkpoints); None takes the first pages' size.
        dtype: How vectors are stored (float16 by default, bfloat16 or float32).
        info: Free-form, JSON-serialisable facts about the whole index (model, adapter, pool factor).
    """

    def __init__(self, dim: int | None = None, dtype: torch.dtype = DTYPE, info: dict | None = None):
        self.dim = dim
        self.dtype = dtype
        self.info = dict(info or {})
        self.pages: list[dict] = []
        self._chunks: list[torch.Tensor] = []  # pages added since the last consolidation
        self._vectors = torch.empty(0, dim or 0, dtype=dtype)  # (n_vectors, dim)
        self._offsets = [0]  # page i is vectors[offsets[i] : offsets[i + 1]]
        _check_json(self.info, "info")

    def __len__(self) -> int:
        return len(self.pages)

    def __repr__(self) -> str:
        return (
            f"MultiVectorIndex({len(self)} pages, {self.n_vectors} vectors of dim {self.dim}, "
            f"{str(self.dtype).removeprefix('torch.')}, {self.nbytes / 2**20:.2f} MiB)"
        )

    def add(self, embeddings: Sequence[torch.Tensor], pages: Sequence[dict] | None = None) -> None:
        """Add pages: one (n_tokens, dim) tensor each (padding removed), with one metadata dict each.

        Raises:
            ValueError: a tensor that is not (n_tokens, dim) with n_tokens >= 1, a dim that differs
                from the index's, a count of metadata records that differs, or metadata that is not JSON.
        """
        embeddings = list(embeddings)
        pages = [{} for _ in embeddings] if pages is None else [dict(p) for p in pages]
        if len(pages) != len(embeddings):
            raise ValueError(f"{len(embeddings)} pages of embeddings but {len(pages)} metadata records")
        for i, (embedding, page) in enumerate(zip(embeddings, pages)):
            if embedding.dim() != 2 or embedding.shape[0] == 0:
                raise ValueError(
                    f"page {i}: expected (n_tokens, dim) embeddings with n_tokens >= 1, "
                    f"got shape {tuple(embedding.shape)}"
                )
            if self.dim is None:
                self.dim = embedding.shape[1]
                self._vectors = self._vectors.new_empty(0, self.dim)
            if embedding.shape[1] != self.dim:
                raise ValueError(f"page {i} has dim {embedding.shape[1]}, the index holds dim {self.dim}")
            _check_page(page, f"metadata of page {i}")
        for embedding, page in zip(embeddings, pages):
            vectors = embedding.detach().to("cpu", self.dtype)  # (n_tokens, dim)
            self._chunks.append(vectors)
            self._offsets.append(self._offsets[-1] + vectors.shape[0])
            self.pages.append(page)

    @property
    def vectors(self) -> torch.Tensor:
        """All pages' vectors end to end: (n_vectors, dim)."""
        if self._chunks:
            self._vectors = torch.cat([self._vectors, *self._chunks])
            self._chunks = []
        return self._vectors

    @property
    def offsets(self) -> torch.Tensor:
        """(n_pages + 1,) start of each page in `vectors`, then the total."""
        return torch.tensor(self._offsets, dtype=torch.int64)

    @property
    def n_vectors(self) -> int:
        return self._offsets[-1]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored vectors."""
        return self.n_vectors * (self.dim or 0) * torch.empty((), dtype=self.dtype).element_size()

    def page_embeddings(self) -> list[torch.Tensor]:
        """Each page's (n_tokens_i, dim) vectors, views into `vectors`."""
        vectors, offsets = self.vectors, self._offsets
        return [vectors[a:b] for a, b in zip(offsets, offsets[1:])]

    def scores(self, query_embeddings, batch_size: int = 128) -> torch.Tensor:
        """MaxSim of every query against every page: (n_queries, n_pages) float32.

        Args:
            query_embeddings: A list of (n_tokens_i, dim) tensors, or a (n_queries, n_tokens, dim) tensor
                whose zero rows are padding.

        Raises:
            ValueError: the index is empty, or the queries' dim is not the index's.
        """
        if not self.pages:
            raise ValueError("the index is empty: add pages (index.add) or load a saved index first")
        return score_multi_vector(query_embeddings, self.page_embeddings(), batch_size=batch_size)

    def search(self, query_embeddings, k: int = 5) -> list[list[dict]]:
        """The `k` best pages of each query, best first.

        Returns:
            Per query, a list of {"rank", "index" (position in the index), "score", **page metadata}.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        scores = self.scores(query_embeddings)  # (n_queries, n_pages)
        best = scores.topk(min(k, len(self)), dim=1)
        return [
            [
                {"rank": rank, "index": i, "score": score, **self.pages[i]}
                for rank, (score, i) in enumerate(zip(values, indices), 1)
            ]
            for values, indices in zip(best.values.tolist(), best.indices.tolist())
        ]

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to folder `path` (created), replacing an index saved there before, atomically.

        The new vectors are written beside the old ones under their own name, then `index.json` is replaced in
        one step (a rename), then the old vectors are removed: a crash at any moment leaves the old index or the
        new one, whole. Other files in the folder are left alone.

        Returns:
            The folder.
        """
        if not self.pages:
            raise ValueError("the index is empty: add pages before saving it")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        vectors_file, digest = _write_vectors(
            path, {"vectors": self.vectors.contiguous(), "offsets": self.offsets}
        )
        record = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "dim": self.dim,
            "dtype": str(self.dtype).removeprefix("torch."),
            "n_pages": len(self),
            "n_vectors": self.n_vectors,
            "vectors_file": vectors_file,
            "vectors_sha256": digest,
            "info": self.info,
            "pages": self.pages,
        }
        write_json(path / PAGES_FILE, record)  # one rename: the moment the new index replaces the old
        _remove_other_vectors(path, vectors_file)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> MultiVectorIndex:
        """Read an index written by `save`.

        Raises:
            FileNotFoundError: `path` or one of its two files is missing.
            ValueError: the files are not an index of this format, `index.json` has a field of the wrong kind,
                or the vectors are not those `index.json` was saved with.
        """
        path = Path(path)
        if not (path / PAGES_FILE).is_file():
            raise FileNotFoundError(
                f"{path / PAGES_FILE} does not exist: {path} is not a saved index (it needs {PAGES_FILE} and "
                "the vectors file it names, written by MultiVectorIndex.save)"
            )
        try:
            record = json.loads((path / PAGES_FILE).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} could not be read as an index ({type(err).__name__}: {err})") from err
        if not isinstance(record, dict) or record.get("format") != INDEX_FORMAT:
            raise ValueError(f"{path / PAGES_FILE} is not a {INDEX_FORMAT} file")
        if record.get("version") not in (1, INDEX_VERSION):
            raise ValueError(
                f"{path} is an index of version {record.get('version')}; this kit reads versions 1 and {INDEX_VERSION}"
            )
        _check_record(record, path / PAGES_FILE)
        vectors_file = path / record.get("vectors_file", LEGACY_VECTORS_FILE)
        if not vectors_file.is_file():
            raise FileNotFoundError(f"{vectors_file} does not exist: the index at {path} lacks its vectors")
        if "vectors_sha256" in record and _sha256(vectors_file) != record["vectors_sha256"]:
            raise ValueError(
                f"{vectors_file} is not the file {PAGES_FILE} was saved with (its SHA-256 differs): it was changed "
                "or damaged after the save; rebuild the index"
            )
        try:
            tensors = load_file(str(vectors_file))
        except Exception as err:
            raise ValueError(f"{path} could not be read as an index ({type(err).__name__}: {err})") from err
        vectors, offsets = tensors.get("vectors"), tensors.get("offsets")
        if (
            vectors is None
            or offsets is None
            or vectors.dim() != 2
            or vectors.shape[1] != record["dim"]
            or len(offsets) != record["n_pages"] + 1
            or offsets[0] != 0
            or offsets[-1] != vectors.shape[0]
            or bool((offsets.diff() < 1).any())
            or len(record["pages"]) != record["n_pages"]
        ):
            raise ValueError(
                f"{path}: {vectors_file.name} and {PAGES_FILE} disagree (pages, vectors or dim); rebuild the index"
            )
        index = cls(record["dim"], vectors.dtype, record["info"])
        index._vectors, index._offsets, index.pages = vectors, offsets.tolist(), record["pages"]
        return index


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(2**24), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_vectors(folder: Path, tensors: dict) -> tuple[str, str]:
    """Write `tensors` into `folder` as vectors-<hash>.safetensors (a temporary name first); its name and SHA-256."""
    tmp = folder / ".vectors.safetensors.tmp"
    try:
        save_file(tensors, str(tmp))
        usual_mode(tmp)
        digest = _sha256(tmp)
        name = f"vectors-{digest[:16]}.safetensors"
        os.replace(tmp, folder / name)
    finally:
        tmp.unlink(missing_ok=True)
    return name, digest


def _remove_other_vectors(folder: Path, keep: str) -> None:
    for old in [*folder.glob("vectors-*.safetensors"), folder / LEGACY_VECTORS_FILE]:
        if old.name != keep and old.is_file():
            old.unlink()


def _check_record(record: dict, where: Path) -> None:
    """Each field of an `index.json` of the kind `save` writes, or one ValueError naming the first that is not."""
    kinds = {"dim": int, "n_pages": int, "pages": list, "info": dict, "dtype": str}
    for field, kind in kinds.items():
        value = record.get(field)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
            wanted = "a positive whole number" if kind is int else f"a JSON {kind.__name__}"
            raise ValueError(
                f"{where}: `{field}` should be {wanted}, found {value!r}; rebuild the index or restore the file"
            )
    for i, page in enumerate(record["pages"]):
        if not isinstance(page, dict):
            raise ValueError(f"{where}: page {i} should be a JSON object of metadata, found {page!r}")
        _check_page(page, f"{where}: page {i}")


def _check_page(page: dict, what: str) -> None:
    clash = [key for key in RESULT_FIELDS if key in page]
    if clash:
        raise ValueError(
            f"{what} has the key(s) {clash}, which search results use for their own fields ({', '.join(RESULT_FIELDS)}); "
            "rename them (e.g. 'page_score')"
        )
    _check_json(page, what)


def _check_json(value, what: str) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be JSON-serialisable (str, numbers, lists, dicts): {err}") from err
