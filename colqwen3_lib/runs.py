"""A training run's folder: when it may be written, what a resumed run must keep, and the run's record.

- `prepare_output_dir`: a new or empty folder, or one holding only an unstarted run of the kit, is
  used; a folder with anything else (a finished run, a user's files) is refused and never overwritten.
  Resuming writes only into the folder of the run being resumed, or into a new one.
- `check_resume`: settings that define the run (base model, LoRA layout, trainer, loss and its
  temperature, batch, seed, data) must match the resumed run's `training_config.json`, or the
  resume is refused with the difference named; settings that may change (learning rate, steps,
  logging, evaluation, saving) are allowed and listed.
- `training_config.json` is written when a run starts and never rewritten by a resume; each resume
  and what it changed are appended to `run_history.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

from .checkpoints import CHECKPOINT_PREFIX, checkpoints
from .config import CONFIG_FILE, LATEST, TrainConfig, world_size
from .files import write_json

logger = logging.getLogger(__name__)

HISTORY_FILE = "run_history.json"
# What defines a run: a resume with another value trains something else, or crashes.
MUST_MATCH = (
    "base_model_path",
    "trainer",
    "loss",
    "tau",
    "normalize_scores",
    "hard_negative_weight",
    "peft",
    "head_in_full",
    "dim",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "max_visual_tokens",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "train_dataset",
)
# Never compared: where the run is written and which checkpoint it resumes.
NOT_SETTINGS = ("output_dir", "resume_from_checkpoint")
_TMP_PREFIX = f".tmp-{CHECKPOINT_PREFIX}"


def _unstarted_run(entries: list[Path]) -> bool:
    """Only what a run of the kit writes before its first checkpoint: its record, and half-written checkpoints."""
    return any(p.name == CONFIG_FILE for p in entries) and all(
        p.name in (CONFIG_FILE, HISTORY_FILE) or p.name.startswith(_TMP_PREFIX) for p in entries
    )


def prepare_output_dir(config: TrainConfig) -> None:
    """Check that `config.output_dir` may be written, and clear what an unstarted run of the kit left there.

    Raises:
        FileExistsError: the folder holds anything else (and this is not a resume of the run in it).
        ValueError: `--output-dir` is a file.
    """
    folder = Path(config.output_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output-dir {folder} is a file; give the path of a folder (new or empty)")
    entries = list(folder.iterdir()) if folder.is_dir() else []
    resume = config.resume_from_checkpoint
    if not entries:
        return
    own_run = (folder / CONFIG_FILE).exists()
    if resume == LATEST and own_run:
        return
    if resume and resume != LATEST and own_run and Path(resume).resolve().parent == folder.resolve():
        return
    if _unstarted_run(entries) and not resume:
        logger.warning(
            f"{folder} holds only a run of the kit that stopped before its first checkpoint: starting it again there"
        )
        for p in entries:
            if p.name.startswith(_TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
        return
    advice = "Choose a new --output-dir or delete this one"
    if own_run and checkpoints(folder):
        advice += f", or continue its run with --resume-from-checkpoint {LATEST}"
    if resume:
        advice = (
            f"To continue {resume} into a new folder, give an empty --output-dir; to continue the run in {folder}, "
            f"pass --resume-from-checkpoint {LATEST}"
            if own_run
            else "Give an empty --output-dir"
        )
    raise FileExistsError(
        f"--output-dir {folder} is not empty ({len(entries)} entries, e.g. {sorted(p.name for p in entries)[:3]}); "
        f"it is never overwritten. {advice}."
    )


def saved_config(run_dir: Path) -> dict | None:
    """The `training_config.json` of a run folder, or None when it has none."""
    file = run_dir / CONFIG_FILE
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{file} is damaged ({err}); it records the run's settings and cannot be guessed"
        ) from err


def check_resume(config: TrainConfig, checkpoint: Path) -> tuple[TrainConfig, dict]:
    """Compare a resume's settings with those of the run that wrote `checkpoint`.

    A run found by `--auto-batch-size` resumes at the batch it settled on when the effective batch is
    the same. Returns the settings to resume with and the changes ({name: [before, now]}) to record.

    Raises:
        ValueError: a setting in `MUST_MATCH` differs; the message names each difference.
    """
    before = saved_config(checkpoint.parent)
    if before is None:
        logger.warning(f"{checkpoint.parent} has no {CONFIG_FILE}: resuming without checking its settings")
        return config, {}
    now = {**dataclasses.asdict(config), "bf16": config.bf16_enabled, "world_size": world_size()}
    if (
        config.auto_batch_size
        and before.get("effective_batch_size") == config.effective_batch_size
        and before.get("per_device_train_batch_size") != config.per_device_train_batch_size
    ):
        config = dataclasses.replace(
            config,
            per_device_train_batch_size=before["per_device_train_batch_size"],
            gradient_accumulation_steps=before["gradient_accumulation_steps"],
        )
        now.update(dataclasses.asdict(config), bf16=config.bf16_enabled)
    changes = {
        k: [before.get(k), v] for k, v in now.items() if k not in NOT_SETTINGS and before.get(k, v) != v
    }
    refused = {k: pair for k, pair in changes.items() if k in MUST_MATCH}
    if refused:
        listed = "; ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in refused.items())
        raise ValueError(
            f"cannot resume {checkpoint} with other settings than its run's: {listed}. Resume with the run's "
            f"settings (see {checkpoint.parent / CONFIG_FILE}), or start a new run in a new --output-dir"
        )
    return config, changes


def write_record(config: TrainConfig, resumed_from: Path | None, changes: dict) -> None:
    """Write `training_config.json` for a run that starts here; append a resume to `run_history.json`."""
    folder = Path(config.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if resumed_from is None or not (folder / CONFIG_FILE).exists():
        record = {**dataclasses.asdict(config), "world_size": world_size()}
        record.update(bf16=config.bf16_enabled, effective_batch_size=config.effective_batch_size)
        write_json(folder / CONFIG_FILE, record)
    if resumed_from is not None:
        history = json.loads((folder / HISTORY_FILE).read_text()) if (folder / HISTORY_FILE).exists() else []
        history.append(
            {
                "resumed_from": str(resumed_from),
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "changed": changes,
            }
        )
        write_json(folder / HISTORY_FILE, history)
        if changes:
            logger.warning(f"resuming with changed settings (recorded in {HISTORY_FILE}): {changes}")
