"""llm-trainer: distributed LoRA, QLoRA and full fine-tuning with FSDP2 (`torchrun -m pkg.trainer`).

Modules, one job each:
    config      the TrainConfig dataclass: YAML schema, command line, validation
    data        load, detect format, tokenize + mask, pack, cache; the batch plan
    model       tokenizer and model, LoRA / QLoRA / full
    distributed process group and FSDP2 sharding
    recipe      the training recipe: setup, train, save
    checkpoint  sharded, atomic checkpoints and resume; resilience: SIGTERM handling
    export      adapter / merged / full model in Hugging Face formats, atomically
    metrics     progress lines, metrics.jsonl, summary.json, loss.png
    tune        `tune run`, torchtune's command line (the SDK's BuiltinTrainer) -> TrainConfig, launch
    torchtune_configs  torchtune 0.6.1's published configs (generated: scripts/gen_torchtune_configs.py)
"""
