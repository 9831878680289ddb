"""llm-trainer: distributed LoRA, QLoRA and full fine-tuning with FSDP2 (`torchrun -m pkg.trainer`).

Modules, one job each:
    __main__          the entry point: one line and an exit code for an expected failure
    launch            torchrun's run() (the image's ENTRYPOINT, shared with tune): expected errors in one line
    config            the TrainConfig dataclass: YAML schema, command line, validation
    errors            TrainerError / ConfigError / CheckpointError: expected failures and their exit codes
    values            the value parsers (and the YAML file reader) the config and `tune run` share
    recipe            the training recipe: setup, train, save; the model as built for the method (BuiltModel)
    objective         the objective's interface: data, micro-batch loss, metrics, validation, reference
    sft               the SFT objective: cross-entropy of the target tokens (and an MoE's router loss)
    data              the training data's steps in order: rows -> (input_ids, labels) -> train/val records
    data_files        finding and reading the dataset's files: one split (and slice) as one Dataset
    rows              a row as a prompt and completion or as messages: formats, system prompt, templates
    chat_format       messages -> (input_ids, labels): the chat template or a family's special tokens
    spm_model         a SentencePiece model file's user-defined pieces (which sentencepiece matches in text)
    data_cache        the tokenized records on disk: their key, writing and reading them
    batching          packing, padding into tensors, target counts; the batch plan of every step
    preference        DPO's data: prompt/chosen/rejected pairs, tokenized and collated
    model             tokenizer and model, LoRA / QLoRA / full; MoE router loss coefficient
    fused_lora        one fused forward/backward per LoRA linear
    loss              token log-probs and the chunked cross-entropy, without full logits
    vocab_parallel    the output head and embedding split along the vocabulary across ranks
    dpo               the DPO objective: sequence log-probs, losses, metrics, the reference (cached on full)
    distributed       process group, all-ranks decisions (agree, any_rank), FSDP2 sharding
    optim             the optimizer (`optimizer`, `optimizer_in_backward`)
    plan              `python -m pkg.trainer.plan`: the memory planner
    safetensors_stream  reading and writing safetensors one tensor at a time
    host_memory       glibc's mmap threshold, so memory freed in the backward is returned
    checkpoint        saving and loading sharded checkpoints (DCP); resuming past a damaged one
    checkpoint_dirs   where checkpoints live: listed, checked, moved aside, chosen to resume; a finished run
    checkpoint_storage a checkpoint's tensors in its files: their bytes, hashed as written (DCP storage)
    fingerprint       the run fingerprint a checkpoint must match to be resumed
    checksums         XXH3-128 digests of a checkpoint's files: recorded at save, checked at load
    rng               the random generators' state a checkpoint keeps
    disk_space        free space on the output volume: sizes, the check before writing, the full-disk hint
    resilience        SIGTERM / SIGINT: checkpoint at the next step boundary, then exit 143
    output_lock       one job per output_dir: a lock file with host, pid and a renewed lease
    files             atomic files and folders; the folder digest
    export            adapter / merged / full model in Hugging Face formats, atomically
    metrics           progress lines, metrics.jsonl, summary.json, loss.png
    trackers          report_to: TensorBoard, MLflow, W&B, each on a thread of its own
    trainjob_status   progress and metrics into the TrainJob's status (Kubeflow Trainer's status server)
    tune              `tune run`, torchtune's command line (the SDK's BuiltinTrainer) -> TrainConfig, launch
    torchtune_configs torchtune 0.6.1's published configs (generated: scripts/gen_torchtune_configs.py)
"""
