"""What the training loop does besides stepping, re-exported from the modules that own it: verification
(:mod:`recognition.train_verifier`), the ``--ckpt`` policy and checkpoints (:mod:`recognition.checkpoints`), the
resume state, optimizer-state I/O, RNG states and the graceful stop (:mod:`recognition.resume_state`)."""
from __future__ import annotations

from recognition.checkpoints import CheckpointPolicy, prune_checkpoints, save_model, synced_params
from recognition.resume_state import (
    RESUME_VERSION,
    StopFlag,
    get_optimizer_states,
    load_resume_arrays,
    read_resume_state,
    resume_dir,
    rng_state,
    save_resume,
    set_optimizer_states,
    set_rng_state,
)
from recognition.train_verifier import Verifier

__all__ = ["Verifier", "CheckpointPolicy", "save_model", "prune_checkpoints", "StopFlag", "get_optimizer_states",
           "set_optimizer_states", "rng_state", "set_rng_state", "save_resume", "resume_dir", "read_resume_state",
           "load_resume_arrays", "synced_params", "RESUME_VERSION"]
