"""The reference ColQwen3 recipe's settings, defined once (the training README and colpali-engine's script).

Everything that defaults to "what the reference does" reads its number here: the training CLI and
`TrainConfig`, the processor's visual-token cap, the evaluation, the memory planner and the doctor.
"""

from __future__ import annotations

BASE_MODEL = "Qwen/Qwen3-VL-2B-Instruct"
TRAIN_DATASET = "vidore/colpali_train_set"
MODEL_IDS = {
    "2b": "Qwen/Qwen3-VL-2B-Instruct",
    "4b": "Qwen/Qwen3-VL-4B-Instruct",
    "8b": "Qwen/Qwen3-VL-8B-Instruct",
}

EMBEDDING_DIM = 128
MAX_VISUAL_TOKENS = 768
LR = 2e-4
TAU = 0.02  # ColbertLoss(temperature=tau, normalize_scores=True): the `ce` loss
PAIRWISE_TEMPERATURE = 1.0  # ColbertPairwiseCELoss(normalize_scores=False) keeps its default temperature
LORA_RANK = 32
LORA_DROPOUT = 0.1
NUM_TRAIN_EPOCHS = 5.0
WARMUP_STEPS = 100
EVAL_STEPS = 100
SAVE_STEPS = 500
EVAL_BATCH_SIZE = 16
LOGGING_STEPS = 10
SAVE_TOTAL_LIMIT = 1

# Recommended per-device batches: 2B 64; 4B 32-48; 8B 16-32 (both ends of each range).
BATCH_SIZE = 64
RECOMMENDED_BATCHES = (("2b", 64), ("4b", 48), ("4b", 32), ("8b", 32), ("8b", 16))
