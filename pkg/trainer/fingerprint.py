"""The run fingerprint: what a checkpoint (or a finished run's summary.json) must agree on with this run
to be resumed (model, method, dataset and which tokens are targets, batch shape), and one line naming what
differs. Folders are fingerprinted by content (files.dir_digest).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pkg.trainer.data_cache import set_later_settings
from pkg.trainer.files import dir_digest

# Bumped when the same data and settings give the trainer other training samples or another order, so a
# checkpoint saved before is refused rather than resumed onto rows it did not start with (a mid-epoch resume
# would see some rows twice and others never). 2: SFT rows and DPO pairs without a target token kept (they
# were dropped), the training samples in file order before the seeded shuffle (they were permuted first),
# JSON values read as written (a value deep in a large file was cast to the type of its first 10 MiB).
SAMPLES_VERSION = 2


def run_fingerprint(cfg: Any) -> dict[str, str]:
    """What a checkpoint of this run must agree on: model, method, dataset (and which tokens are targets),
    batch shape, and the trainer's way of choosing and ordering the rows (SAMPLES_VERSION).

    ``cfg`` is a TrainConfig. Settings a resumed run may change (``max_steps``, ``num_epochs``,
    learning rate, logging, ``save_every``...) are left out, so extending a run is allowed.
    """
    method = cfg.method
    if method != "full":
        targets = ",".join(cfg.lora_target_modules)
        method += f" (lora_rank={cfg.lora_rank}, lora_alpha={cfg.lora_alpha}, lora_target_modules={targets})"
        method += " with DoRA" * cfg.use_dora
    # Settings added later are named only when set, so older checkpoints keep their fingerprint.
    data_extra = "".join(
        f", {name}={getattr(cfg, name)}"
        for name, default in (("dataset_split", "train"), ("dataset_source", "auto"), ("column_map", {}),
                              ("system_prompt", ""), ("max_steps_per_epoch", 0), ("shuffle", True),
                              ("more_datasets", []))
        if getattr(cfg, name) != default
    )  # fmt: skip
    data_extra += "".join(f", {name}={value}" for name, value in set_later_settings(cfg).items())
    fingerprint = {
        "model": f"{Path(cfg.model_dir).name} (content digest {dir_digest(cfg.model_dir)})",
        "method": method,
        "dataset": (
            f"{Path(cfg.dataset_dir).name} (content digest {dir_digest(cfg.dataset_dir)}, "
            f"dataset_format={cfg.dataset_format}, train_on_prompt={cfg.train_on_prompt}, "
            f"val_fraction={cfg.val_fraction}, seed={cfg.seed}{data_extra})"
        ),
        "batch": (
            f"global_batch_size={cfg.global_batch_size}, max_seq_length={cfg.max_seq_length}, "
            f"packing={cfg.packing}"
        ),
        # Absent from checkpoints saved before version 2: those are refused, naming it.
        "samples": f"the trainer's choice and order of rows, version {SAMPLES_VERSION}",
    }
    if getattr(cfg, "objective", "sft") != "sft":  # SFT fingerprints stay as they were
        fingerprint["objective"] = (
            f"{cfg.objective} (dpo_beta={cfg.dpo_beta}, dpo_loss={cfg.dpo_loss}, "
            f"dpo_label_smoothing={cfg.dpo_label_smoothing})"
        )
        if getattr(cfg, "reference_model_dir", ""):
            ref = cfg.reference_model_dir
            fingerprint["objective"] += f", reference {Path(ref).name} (content digest {dir_digest(ref)})"
    return fingerprint


def fingerprint_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """One line naming what differs between two fingerprints, or None when they agree."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            diffs.append(f"{key}: checkpoint has {saved.get(key)!r}, this run has {current.get(key)!r}")
    return "; ".join(diffs) or None
