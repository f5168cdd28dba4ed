"""ColQwen3 course and reproducibility kit.

from colqwen3_lib import ColQwen3, ColQwen3Processor
"""

from .config import TrainConfig, default_config
from .evaluation import evaluate_model
from .losses import ColbertContrastiveLoss
from .memory import TrainingSetup, estimate_memory
from .model import ColQwen3, load_model, random_model, resolve_attn_implementation
from .oom import find_batch_size, oom_advice, suggest_settings
from .pdf import pdf_to_pages
from .pooling import hierarchical_pooling
from .processor import ColQwen3Processor
from .scoring import score_multi_vector
from .search import MultiVectorIndex
from .tasks import VIDORE_V1_TASKS
from .tiny import make_tiny_checkpoint, resolve_model_path
from .training import train

__all__ = [
    "VIDORE_V1_TASKS",
    "ColbertContrastiveLoss",
    "MultiVectorIndex",
    "ColQwen3",
    "ColQwen3Processor",
    "TrainConfig",
    "TrainingSetup",
    "default_config",
    "estimate_memory",
    "evaluate_model",
    "find_batch_size",
    "hierarchical_pooling",
    "load_model",
    "make_tiny_checkpoint",
    "oom_advice",
    "pdf_to_pages",
    "random_model",
    "resolve_attn_implementation",
    "resolve_model_path",
    "score_multi_vector",
    "suggest_settings",
    "train",
]
__version__ = "0.1.0"
