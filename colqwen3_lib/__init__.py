"""ColQwen3 course and reproducibility kit.

from colqwen3_lib import ColQwen3, ColQwen3Processor
"""

from .evaluation import VIDORE_V1_TASKS, evaluate_model, load_model
from .losses import ColbertContrastiveLoss
from .memory import TrainingSetup, estimate_memory, suggest_settings
from .model import ColQwen3, resolve_attn_implementation
from .processor import ColQwen3Processor
from .scoring import score_multi_vector
from .tiny import make_tiny_checkpoint, resolve_model_path
from .training import TrainConfig, default_config, train

__all__ = [
    "VIDORE_V1_TASKS",
    "ColbertContrastiveLoss",
    "ColQwen3",
    "ColQwen3Processor",
    "TrainConfig",
    "TrainingSetup",
    "default_config",
    "estimate_memory",
    "evaluate_model",
    "load_model",
    "make_tiny_checkpoint",
    "resolve_attn_implementation",
    "resolve_model_path",
    "score_multi_vector",
    "suggest_settings",
    "train",
]
__version__ = "0.1.0"
