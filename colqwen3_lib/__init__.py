"""ColQwen3 course and reproducibility kit."""

from .model import ColQwen3, resolve_attn_implementation
from .processor import ColQwen3Processor
from .scoring import score_multi_vector
from .tiny import make_tiny_checkpoint, resolve_model_path

__all__ = [
    "ColQwen3",
    "ColQwen3Processor",
    "make_tiny_checkpoint",
    "resolve_attn_implementation",
    "resolve_model_path",
    "score_multi_vector",
]
__version__ = "0.1.0"
