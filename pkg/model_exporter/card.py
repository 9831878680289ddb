"""What the run was (base model, data, method, steps, losses), for the Hub's model card, the S3 manifest and
the registry's metadata: from summary.json, the run's config.yaml, and the completion markers the initializers
left next to the model and dataset they fetched (which name the STORAGE_URI each came from)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pkg.initializers.manifest import MANIFEST, STATE_DIR
from pkg.initializers.uri import HfUri, parse_uri

from .outputs import Selection

_LOSSES = ("first_loss", "final_loss", "final_val_loss")


def describe_run(source: Path, selection: Selection) -> dict[str, Any]:
    """base_model / dataset (STORAGE_URIs, or the local folder), method, steps, losses and the config."""
    config = _read_config(source / "config.yaml")
    model_dir = Path(str(config.get("model_dir") or source.parent / "model"))
    dataset_dir = Path(str(config.get("dataset_dir") or source.parent / "dataset"))
    summary = selection.summary
    run: dict[str, Any] = {
        "exported": selection.what,
        "base_model": _origin(model_dir),
        "dataset": _origin(dataset_dir),
        "method": summary.get("method") or config.get("method"),
        "objective": summary.get("objective") or config.get("objective"),
        "steps": summary.get("steps"),
        **{k: summary.get(k) for k in _LOSSES if summary.get(k) is not None},
        "fingerprint": summary.get("fingerprint"),
    }
    for key in ("lora_rank", "lora_alpha", "learning_rate", "max_seq_length", "num_epochs"):
        if key in config:
            run.setdefault("config", {})[key] = config[key]
    return {k: v for k, v in run.items() if v is not None}


def _read_config(path: Path) -> dict[str, Any]:
    try:
        import yaml  # ships with huggingface_hub in the exporter image

        data = yaml.safe_load(path.read_text())
    except Exception:  # optional: a card without the config is still a card
        return {}
    return data if isinstance(data, dict) else {}


def _origin(folder: Path) -> str | None:
    """The STORAGE_URI the initializer fetched `folder` from, else the folder itself if it exists."""
    try:
        marker = json.loads((folder / STATE_DIR / MANIFEST).read_text())
        uri = marker["request"]["storage_uri"]
        return str(uri) if isinstance(uri, str) else None
    except (OSError, ValueError, KeyError, TypeError):
        return str(folder) if folder.is_dir() else None


def hub_id(uri: str | None) -> str | None:
    """ORG/NAME of an hf:// URI (what a model card's `base_model` wants), else None."""
    if not uri or not uri.startswith("hf://"):
        return None
    try:
        parsed = parse_uri(uri)
    except Exception:
        return None
    return parsed.repo_id if isinstance(parsed, HfUri) else None


def model_card(run: dict[str, Any], repo_id: str) -> str:
    """A Hub README.md: YAML metadata (base_model, library, tags, datasets) and a short account of the run."""
    base = hub_id(run.get("base_model"))
    data = hub_id(run.get("dataset"))
    adapter = run.get("exported") == "adapter"
    meta = ["---"]
    if base:
        meta.append(f"base_model: {base}")
    meta.append(f"library_name: {'peft' if adapter else 'transformers'}")
    if data:
        meta += ["datasets:", f"- {data}"]
    meta += ["tags:", "- kubeflow-trainer", f"- {run.get('method') or 'fine-tuned'}"]
    if run.get("objective"):
        meta.append(f"- {run['objective']}")
    meta.append("---")
    what = "LoRA adapter" if adapter else "model"
    lines = [
        *meta,
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A {what} fine-tuned with Kubeflow Trainer's llm-trainer and exported by its model-exporter.",
        "",
        "| | |",
        "|---|---|",
    ]
    rows = [
        ("base model", run.get("base_model")),
        ("dataset", run.get("dataset")),
        ("method", run.get("method")),
        ("objective", run.get("objective")),
        ("steps", run.get("steps")),
        ("first loss", _number(run.get("first_loss"))),
        ("final loss", _number(run.get("final_loss"))),
        ("final validation loss", _number(run.get("final_val_loss"))),
        *((k.replace("_", " "), v) for k, v in run.get("config", {}).items()),
    ]
    lines += [f"| {k} | {v} |" for k, v in rows if v is not None]
    if adapter and base:
        lines += [
            "",
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")',
            "```",
        ]
    return "\n".join(lines) + "\n"


def _number(value: Any) -> str | None:
    return f"{value:.4f}" if isinstance(value, (int, float)) else None
