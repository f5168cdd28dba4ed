"""mteb's own evaluation on a kit model: `mteb.evaluate(ColQwen3Encoder(model, processor), tasks)`.

`ColQwen3Encoder` wraps a model in memory (a `ColQwen3`, or a `PeftModel` with its adapter) and its processor
as an mteb encoder: pages and queries become multi-vector embeddings (the kit's own `embed_images` and
`embed_queries`, zero-padded into one tensor) and are scored by the kit's exact MaxSim. It runs on mteb's
ViDoRe tasks (`mteb.get_benchmark("ViDoRe(v1)")`, ...) and on local test sets in the BEIR layout through
`local_retrieval_task` (the synthetic mirrors, say). mteb is optional (`pip install 'colqwen3-lib[mteb]'`):
only this module imports it, and nothing in the kit imports this module.

    import mteb
    from colqwen3_lib import load_model
    from colqwen3_lib.mteb_wrapper import ColQwen3Encoder

    model, processor = load_model("Qwen/Qwen3-VL-2B-Instruct", adapter="./models/colqwen3-2b")
    results = mteb.evaluate(ColQwen3Encoder(model, processor), mteb.get_benchmark("ViDoRe(v1)"))
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .data import load_split
from .evaluation import BATCH_SIZE, QUERY_BATCH_SIZE, SCORE_BATCH_SIZE, embed_images, embed_queries
from .metrics import MAIN_SCORE
from .scoring import score_multi_vector
from .synthetic import SYNTHETIC_BEIR_TASKS, synthetic_docs
from .tasks import SPLIT

try:
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
except ImportError as err:
    raise ImportError(
        "colqwen3_lib.mteb_wrapper needs mteb (>= 2.18.19): pip install 'colqwen3-lib[mteb]'; the rest of "
        "the kit, including `python -m colqwen3_lib.evaluate --protocol mteb`, works without it"
    ) from err

MODEL_NAME = "colqwen3-lib/colqwen3"  # mteb wants `organisation/name`


def _unpadded(embeddings: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    """Each item's real token rows: the kit's embeddings are L2-normalised, so an all-zero row is padding."""
    return [e[e.ne(0).any(dim=-1)] for e in embeddings]


class ColQwen3Encoder(AbsEncoder):
    """A kit model and its processor as an mteb encoder (text queries, page images; MaxSim, late interaction).

    Args:
        model: A `ColQwen3` or a `PeftModel` around one, on its device (put in eval mode).
        processor: Its `ColQwen3Processor` (prompts and visual-token cap as the model was trained).
        name: The model's name in mteb's results (`organisation/name`).
        revision: Its revision in mteb's results (e.g. the adapter's commit or training run).
        batch_size: Pages per forward pass; within each of mteb's batches, pages are grouped by size.
        query_batch_size: Queries per forward pass.
        score_batch_size: Queries per MaxSim block.
    """

    def __init__(
        self,
        model,
        processor,
        name: str = MODEL_NAME,
        revision: str | None = None,
        batch_size: int = BATCH_SIZE,
        query_batch_size: int = QUERY_BATCH_SIZE,
        score_batch_size: int = SCORE_BATCH_SIZE,
    ):
        self.model = model.eval()
        self.processor = processor
        self.batch_size, self.query_batch_size, self.score_batch_size = (
            batch_size,
            query_batch_size,
            score_batch_size,
        )
        self.device = next(model.parameters()).device
        self.mteb_model_meta = ModelMeta(
            loader=None,
            name=name,
            revision=revision,
            release_date=None,
            languages=None,
            n_parameters=sum(p.numel() for p in model.parameters()),
            memory_usage_mb=None,
            max_tokens=None,
            embed_dim=getattr(getattr(model, "config", None), "embedding_dim", None),
            license=None,
            open_weights=True,
            public_training_code=None,
            public_training_data=None,
            framework=["PyTorch", "Transformers"],
            similarity_fn_name=ScoringFunction.MAX_SIM,
            use_instructions=False,
            training_datasets=None,
            modalities=["image", "text"],
            model_type=["late-interaction"],
        )

    def encode(
        self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs
    ) -> torch.Tensor:
        """Embed mteb's batches of pages (`image`) or queries (`text`).

        Returns:
            (n_items, max_tokens, dim) float32 CPU tensor, zero-padded.

        Raises:
            ValueError: a batch holds both or neither of text and images (fused inputs are not supported).
        """
        embeddings: list[torch.Tensor] = []
        for batch in inputs:
            if ("image" in batch) == ("text" in batch):
                raise ValueError(
                    f"{task_metadata.name}: ColQwen3 embeds either page images or query texts, got a batch "
                    f"with {sorted(k for k in batch if k in ('image', 'text')) or 'neither'}"
                )
            if "image" in batch:
                embeddings.extend(embed_images(self.model, self.processor, batch["image"], self.batch_size))
            else:
                embeddings.extend(
                    embed_queries(self.model, self.processor, batch["text"], self.query_batch_size)
                )
        return torch.nn.utils.rnn.pad_sequence([e.float() for e in embeddings], batch_first=True)

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        """MaxSim scores (n_queries, n_pages), padding left out (the kit's `score_multi_vector`)."""
        return score_multi_vector(
            _unpadded(torch.as_tensor(embeddings1)),
            _unpadded(torch.as_tensor(embeddings2)),
            batch_size=self.score_batch_size,
            device=self.device,
        )

    def similarity_pairwise(self, embeddings1, embeddings2) -> torch.Tensor:
        """MaxSim score of each query with the page at the same position: (n,)."""
        queries, pages = _unpadded(torch.as_tensor(embeddings1)), _unpadded(torch.as_tensor(embeddings2))
        return torch.stack(
            [score_multi_vector([q], [p], device=self.device)[0, 0] for q, p in zip(queries, pages)]
        )


def local_retrieval_task(
    path_or_name: str | os.PathLike,
    name: str | None = None,
    main_score: str = MAIN_SCORE,
    split: str = SPLIT,
) -> AbsTaskRetrieval:
    """A local test set in the BEIR layout (folders `corpus`, `queries`, `qrels`) as an mteb retrieval task.

    It is read the way mteb reads ViDoRe's BEIR datasets: ids as strings, every corpus row a document,
    relevance as given. A synthetic mirror's name (`synthetic_charts_test_beir`) names the synthetic set.

    Args:
        path_or_name: The folder, or a name in `synthetic.SYNTHETIC_BEIR_TASKS`.
        name: The task's name in mteb's results (default: the folder's name).
        main_score: The metric mteb reports as the task's main score.
        split: The split to evaluate.

    Raises:
        ValueError: the folder is not in the BEIR layout.
    """
    path = Path(
        synthetic_docs()[str(path_or_name)] if str(path_or_name) in SYNTHETIC_BEIR_TASKS else path_or_name
    )
    if not all((path / part).is_dir() for part in ("corpus", "queries", "qrels")):
        raise ValueError(
            f"{path} is not a test set in the BEIR layout: it needs folders corpus, queries and qrels"
        )
    metadata = TaskMetadata(
        name=name or path.name,
        description=f"The local test set {path} (BEIR layout), read as mteb reads ViDoRe's BEIR datasets.",
        dataset={"path": str(path), "revision": "local"},
        type="DocumentUnderstanding",
        category="t2i",
        modalities=["text", "image"],
        eval_splits=[split],
        eval_langs=["eng-Latn"],
        main_score=main_score,
    )

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        corpus = load_split(path / "corpus", split)
        corpus = corpus.map(lambda row: {"id": str(row["corpus-id"])}, remove_columns=["corpus-id"])
        queries = load_split(path / "queries", split)
        queries = queries.map(
            lambda row: {"id": str(row["query-id"]), "text": row["query"]},
            remove_columns=["query-id", "query"],
        )
        relevant: dict[str, dict[str, int]] = {}
        qrels = load_split(path / "qrels", split)
        for qid, cid, score in zip(qrels["query-id"], qrels["corpus-id"], qrels["score"]):
            relevant.setdefault(str(qid), {})[str(cid)] = int(score)
        self.dataset = {
            "default": {
                split: {
                    "corpus": corpus.select_columns(["id", "image"]),
                    "queries": queries.select_columns(["id", "text"]),
                    "relevant_docs": relevant,
                    "top_ranked": None,
                }
            }
        }
        self.data_loaded = True

    task_class = type(
        "LocalRetrievalTask", (AbsTaskRetrieval,), {"metadata": metadata, "load_data": load_data}
    )
    return task_class()
