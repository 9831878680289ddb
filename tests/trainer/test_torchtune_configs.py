"""torchtune 0.6.1's published configs, exactly: every text config of the seven recipes `tune run` answers,
compared setting by setting with the YAML file inside the torchtune wheel (installed with --no-deps from
requirements/torchtune.txt; never imported), and config files read as torchtune reads them.

The expected values below are computed from the raw YAML here, independently of pkg/trainer/tune.py.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

import pytest
import yaml

from pkg.trainer import tune
from pkg.trainer.config import TrainConfig
from pkg.trainer.errors import ConfigError
from pkg.trainer.torchtune_configs import CONFIGS, RECIPE_CONFIGS, VERSION

pytestmark = pytest.mark.fast
REPO = Path(__file__).resolve().parents[2]
CONTEXT = 4096  # the test model folder's max_position_embeddings (a null max_seq_len means no truncation)


def wheel_file(path: str) -> Path:
    try:
        dist = importlib.metadata.distribution("torchtune")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("torchtune 0.6.1 is not installed: pip install --no-deps -r requirements/torchtune.txt")
    assert dist.version == VERSION == "0.6.1"
    return Path(dist.locate_file(path))


@pytest.fixture(scope="module")
def generator():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gen_torchtune_configs
    finally:
        sys.path.pop(0)
    return gen_torchtune_configs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("model")
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama", "max_position_embeddings": CONTEXT})
    )
    return str(folder)


def test_the_table_is_generated_from_the_wheel(generator):
    wheel_file("torchtune/_recipe_registry.py")
    table = generator.generate(generator.Wheel(None))
    assert generator.render(table) == generator.TABLE.read_text(), "run scripts/gen_torchtune_configs.py"
    assert table["torchtune"] == "0.6.1"
    assert sum(len(names) for names in RECIPE_CONFIGS.values()) == len(CONFIGS) == 117


# What the recipes of 0.6.1 do with each setting, read from the raw YAML.
ATTN = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj"}
DEFAULT_DECAY = {"torch.optim.AdamW": 0.01, "bitsandbytes.optim.PagedAdamW": 0.01,
                 "bitsandbytes.optim.PagedAdamW8bit": 0.01}  # fmt: skip
# Keys whose value the trainer cannot have today: set to what it can, and the refusal checked.
ACCEPTABLE = {"optimizer._component_": "torch.optim.AdamW", "enable_activation_offloading": "False",
              "compile": "False"}  # fmt: skip
# The optimizers the trainer has (others are blocked above).
OPTIMIZERS = {"torch.optim.AdamW": "adamw", "torch.optim.Adam": "adamw", "torch.optim.SGD": "sgd",
              "bitsandbytes.optim.AdamW8bit": "adamw_8bit",
              "bitsandbytes.optim.PagedAdamW8bit": "paged_adamw_8bit"}  # fmt: skip


def expected(raw: dict, recipe: str, world: int, model_dir: str) -> dict:
    data, model, opt = raw["dataset"], raw["model"], raw["optimizer"]
    accum = raw["gradient_accumulation_steps"]
    out = {
        "learning_rate": float(opt["lr"]),
        "weight_decay": float(opt.get("weight_decay", DEFAULT_DECAY[opt["_component_"]])),
        "lr_scheduler": "cosine" if "lr_scheduler" in raw else "constant",
        "warmup_steps": raw["lr_scheduler"]["num_warmup_steps"] if "lr_scheduler" in raw else 0,
        "micro_batch_size": raw["batch_size"],
        "global_batch_size": raw["batch_size"] * world * accum,
        "num_epochs": raw["epochs"],
        "max_steps_per_epoch": raw["max_steps_per_epoch"] or 0,
        "max_grad_norm": float(raw.get("clip_grad_norm") or 0.0),
        "activation_checkpointing": raw.get("enable_activation_checkpointing", False),
        "dataset_split": data.get("split", "train"),
        "packing": data.get("packed", False),
        "max_seq_length": raw["tokenizer"].get("max_seq_len") or CONTEXT,
        "seed": raw["seed"] if raw["seed"] is not None else TrainConfig().seed,
        "precision": raw["dtype"],
        "model_dir": model_dir,
        "objective": "dpo" if "dpo" in recipe else "sft",
        "shuffle": raw["shuffle"],
        "decay_all_parameters": True,
        "torchtune_layout": True,  # torch.optim.AdamW(model.parameters()): biases and norms too
        "warmup_from_zero": "lr_scheduler" in raw,  # get_cosine_schedule_with_warmup: lr 0 at step 0
        "optimizer": OPTIMIZERS.get(opt["_component_"], "adamw"),
        # False leaves it to auto: in the backward only where the weights are bit for bit the same
        "optimizer_in_backward": "true" if raw.get("optimizer_in_bwd") else "auto",
        "cpu_offload": raw.get("fsdp_cpu_offload", False),
    }
    builder = data["_component_"].rsplit(".", 1)[-1]
    if builder in ("alpaca_dataset", "alpaca_cleaned_dataset"):
        out.update(dataset_format="alpaca", column_map={}, train_on_prompt=data.get("train_on_input", True))
    elif builder == "stack_exchange_paired_dataset":
        out.update(
            column_map={"prompt": "question", "chosen": "response_j", "rejected": "response_k"},
            train_on_prompt=False,
        )
    else:
        raise AssertionError(f"a builder this test does not know: {builder}")
    if recipe.startswith("lora"):
        attn = [ATTN[name] for name in model["lora_attn_modules"]]
        mlp = ["gate_proj", "up_proj", "down_proj"] if model.get("apply_lora_to_mlp") else []
        output = ["lm_head"] if model.get("apply_lora_to_output") else []
        qlora = model["_component_"].rsplit(".", 1)[-1].startswith("qlora_") or model.get("quantize_base")
        out.update(
            method="qlora" if qlora else "lora", lora_rank=model["lora_rank"], lora_alpha=model["lora_alpha"],
            lora_dropout=model.get("lora_dropout", 0.0), lora_target_modules=attn + mlp + output,
            use_dora=model.get("use_dora", False),
            merge_adapter=not raw.get("save_adapter_weights_only", False),
        )  # fmt: skip
    else:
        out["method"] = "full"
    if "loss" in raw and "beta" in raw["loss"]:
        out.update(dpo_beta=raw["loss"]["beta"], dpo_label_smoothing=raw["loss"].get("label_smoothing", 0))
    return out


CASES = [(recipe, name) for recipe, names in RECIPE_CONFIGS.items() for name in names]


@pytest.mark.parametrize(("recipe", "name"), CASES, ids=[f"{r}:{n}" for r, n in CASES])
def test_every_published_config_runs_its_own_settings(recipe, name, model_dir):
    raw = yaml.safe_load(wheel_file(f"recipes/configs/{name}.yaml").read_text())
    world = 1 if recipe.endswith("single_device") else 2
    overrides = {"checkpointer.checkpoint_dir": model_dir}
    cmd = tune.Command([], recipe, name, overrides)
    flat = tune.flatten(raw)
    blocked = {k: v for k, v in ACCEPTABLE.items() if k in flat and str(flat[k]) != v}
    if flat.get("optimizer._component_") in OPTIMIZERS:
        blocked.pop("optimizer._component_", None)
    if blocked:  # refused as a whole, by the key's name, until the trainer has it (#24)
        with pytest.raises(ConfigError) as exc:
            tune.translate(cmd, world)
        assert str(exc.value).split("=")[0] in blocked, exc.value
        cmd = tune.Command([], recipe, name, {**overrides, **{k: ACCEPTABLE[k] for k in blocked}})
    cfg, warnings = tune.translate(cmd, world)
    assert warnings == []
    got = {key: getattr(cfg, key) for key in expected(raw, recipe, world, model_dir)}
    assert got == expected(raw, recipe, world, model_dir)
    # The same file given as a path (what `tune cp` of torchtune itself writes) runs the same settings.
    # (its checkpoint_files name the files of torchtune's authors' model folder: removed with ~key)
    as_file = tune.Command([], recipe, str(wheel_file(f"recipes/configs/{name}.yaml")),
                           {**cmd.overrides, "checkpointer.checkpoint_files": tune.DELETE})  # fmt: skip
    if "ref_checkpointer" in raw:  # full DPO's reference: the same model (the authors' folder, here ours)
        as_file.overrides.update({"ref_checkpointer.checkpoint_dir": model_dir,
                                  "ref_checkpointer.checkpoint_files": tune.DELETE})  # fmt: skip
    from_file, _ = tune.translate(as_file, world)
    differing = {
        k: (getattr(from_file, k), v)
        for k, v in got.items()
        if getattr(from_file, k) != v and k != "model_dir"
    }
    assert not differing


@pytest.mark.parametrize(("recipe", "name"), CASES[::7], ids=[f"{r}:{n}" for r, n in CASES[::7]])
def test_tune_cp_writes_a_file_tune_run_reads_back_unchanged(tmp_path, recipe, name, model_dir, capsys):
    dest = tmp_path / "my"
    assert tune.main(["cp", name, str(dest)]) == 0
    assert (tmp_path / "my.yaml").exists() and f"Copied {name}" in capsys.readouterr().out
    assert tune.main(["cp", name, str(dest)]) == 2  # never overwrites
    world = 1 if recipe.endswith("single_device") else 2
    overrides = {"checkpointer.checkpoint_dir": model_dir, **ACCEPTABLE}
    overrides = {k: v for k, v in overrides.items() if k in CONFIGS[name] or "/" in v}
    published, _ = tune.translate(tune.Command([], recipe, name, overrides), world)
    copied, warnings = tune.translate(tune.Command([], recipe, str(tmp_path / "my.yaml"), overrides), world)
    assert copied == published and warnings == []


def test_a_config_file_is_read_as_torchtune_reads_it(tmp_path, model_dir):
    """Relative path without .yaml, nested groups, _component_, interpolation; the command line wins."""
    (tmp_path / "my_config").write_text(
        f"""
output_dir: {tmp_path}/out
checkpointer:
  _component_: torchtune.training.FullModelHFCheckpointer
  checkpoint_dir: {model_dir}
  output_dir: ${{output_dir}}
model:
  _component_: torchtune.models.qwen2_5.lora_qwen2_5_1_5b_instruct
  lora_attn_modules: [q_proj, k_proj]
  apply_lora_to_mlp: False
  lora_rank: 12
  lora_alpha: 24
tokenizer:
  max_seq_len: 384
dataset:
  _component_: torchtune.datasets.instruct_dataset
  data_files: ${{output_dir}}/../data.jsonl
  column_map: {{input: question, output: answer}}
  split: train[:50%]
metric_logger:
  _component_: torchtune.training.metric_logging.DiskLogger
  log_dir: ${{output_dir}}/logs
optimizer:
  _component_: torch.optim.AdamW
  lr: 4e-4
lr_scheduler:
  _component_: torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup
  num_warmup_steps: 5
batch_size: 3
gradient_accumulation_steps: 2
epochs: 2
clip_grad_norm: 0.7
save_adapter_weights_only: True
log_level: INFO
"""
    )
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        cmd = tune.parse_command(["run", "lora_finetune_distributed", "--config", "my_config", "epochs=3",
                                  "optimizer.weight_decay=0.1"])  # fmt: skip
        cfg, warnings = tune.translate(cmd, 2)
    finally:
        os.chdir(cwd)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules) == (12, 24, ["q_proj", "k_proj"])
    assert (cfg.learning_rate, cfg.weight_decay, cfg.warmup_steps, cfg.lr_scheduler) == (
        4e-4,
        0.1,
        5,
        "cosine",
    )
    assert (cfg.micro_batch_size, cfg.global_batch_size, cfg.num_epochs, cfg.max_grad_norm) == (3, 12, 3, 0.7)
    assert (cfg.output_dir, cfg.dataset_dir) == (f"{tmp_path}/out", f"{tmp_path}/out/../data.jsonl")
    assert (cfg.column_map, cfg.dataset_split, cfg.max_seq_length) == (
        {"input": "question", "output": "answer"}, "train[:50%]", 384,
    )  # fmt: skip
    assert cfg.merge_adapter is False and cfg.dataset_format == "input_output"
    assert warnings == ["log_level=INFO has no effect in the llm-trainer: The trainer logs at INFO."]


SHARDS = "model-{}-of-{}.safetensors"


@pytest.mark.parametrize(
    ("args", "check"),
    [
        (["dataset=torchtune.datasets.text_completion_dataset", "dataset.column=body",
          "dataset.add_eos=False"],
         lambda c: (c.dataset_format, c.column_map, c.add_eos) == ("text", {"text": "body"}, False)),
        (["dataset._component_=torchtune.datasets.chat_dataset", "~dataset.packed",
          "dataset.conversation_column=dialog", "dataset.conversation_style=sharegpt"],
         lambda c: (c.dataset_format, c.column_map, c.train_on_prompt) == ("messages", {"messages": "dialog"},
                                                                           False)),
        (["dataset=torchtune.datasets.slimorca_dataset"],
         lambda c: (c.dataset_format, c.column_map) == ("messages", {"messages": "conversations"})),
        (["dataset=torchtune.datasets.grammar_dataset"],
         lambda c: (c.dataset_format, c.column_map, c.train_on_prompt) == ("input_output", {}, False)),
        (["dataset._component_=torchtune.datasets.samsum_dataset", "dataset.new_system_prompt=Sum up."],
         lambda c: (c.dataset_format, c.column_map, c.system_prompt) == (
             "input_output", {"input": "dialogue", "output": "summary"}, "Sum up.")),
        (["dataset=torchtune.datasets.samsum_dataset", "dataset.column_map={input: chat}"],  # replaces
         lambda c: c.column_map == {"input": "chat"}),
        (["dataset=torchtune.datasets.cnn_dailymail_articles_dataset", "~dataset.packed",
          "tokenizer.max_seq_len=64", "dataset.max_seq_len=64"],
         lambda c: (c.dataset_format, c.column_map, c.add_eos, c.max_seq_length) == (
             "text", {"text": "article"}, True, 64)),
        (["dataset._component_=torchtune.datasets.wikitext_dataset",
          "dataset.split=train[:10]"],
         lambda c: (c.dataset_format, c.column_map, c.dataset_split) == ("text", {"text": "page"},
                                                                         "train[:10]")),
        (["dataset.train_on_input=False"], lambda c: c.train_on_prompt is False),
        ([], lambda c: c.train_on_prompt is True),  # alpaca_cleaned_dataset's default
        (["~lr_scheduler"], lambda c: (c.lr_scheduler, c.warmup_steps) == ("constant", 0)),
        (["dataset_val._component_=torchtune.datasets.alpaca_cleaned_dataset", "dataset_val.packed=False",
          "dataset_val.split=train[95%:]", "dataset_val.data_files=/v.json", "run_val_every_n_steps=20"],
         lambda c: (c.val_dataset_split, c.val_dataset_dir, c.eval_every) == ("train[95%:]", "/v.json", 20)),
        (["clip_grad_norm=2.5", "seed=3", "tokenizer.max_seq_len=64"],
         lambda c: (c.max_grad_norm, c.seed, c.max_seq_length) == (2.5, 3, 64)),
        ([f"checkpointer.checkpoint_files={{filename_format: '{SHARDS}', max_filename: '02'}}"],
         lambda c: True),
        # the memory and scale keys (world 2 here)
        (["optimizer._component_=torch.optim.SGD"], lambda c: c.optimizer == "sgd"),
        (["optimizer._component_=bitsandbytes.optim.PagedAdamW8bit"],
         lambda c: c.optimizer == "paged_adamw_8bit"),
        (["fsdp_cpu_offload=True"], lambda c: c.cpu_offload is True),
        (["data_parallel_replicate_dim=2"], lambda c: (c.sharding, c.shard_group_size) == ("hybrid", 1)),
        (["data_parallel_shard_dim=2"], lambda c: (c.sharding, c.shard_group_size) == ("full", 2)),
    ],
)  # fmt: skip
def test_torchtune_spellings_of_datasets_and_overrides(model_dir, args, check):
    for name in ("model-01-of-02.safetensors", "model-02-of-02.safetensors"):
        (Path(model_dir) / name).touch()
    cmd = tune.parse_command(["run", "lora_finetune_distributed", "--config", "llama3_2/1B_lora",
                              f"checkpointer.checkpoint_dir={model_dir}", *args])  # fmt: skip
    cfg, _ = tune.translate(cmd, 2)
    assert check(cfg), cfg


LOGGING = "torchtune.training.metric_logging"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["llama3_2/1B_lorra"], "neither a config of torchtune 0.6.1 nor a file; nearest: llama3_2/1B_lora"),
        (["llama3_2/1B_lora", "dataset.conversation_column=x"], "alpaca_cleaned_dataset takes source, "),
        (["llama3_2/1B_lora", "dataset=torchtune.datasets.alpaca_datset"],
         "did you mean torchtune.datasets.alpaca_dataset?"),
        (["llama3_2/1B_lora", "data_parallel_replicate_dim=3"],
         "data_parallel_replicate_dim=3 does not divide the world size"),
        (["llama3_2/1B_lora", "optimizer._component_=bitsandbytes.optim.PagedAdamW"],
         "optimizer._component_=bitsandbytes.optim.PagedAdamW: not available"),
        (["llama3_2/1B_lora", f"metric_logger._component_={LOGGING}.WandBLogger", "metric_logger.entity=t"],
         "set WANDB_ENTITY in the TrainJob's spec.trainer.env"),
        (["llama3_2/1B_lora", "enable_activation_offloading=True"], "does not offload activations"),
        (["llama3_2/1B_lora", "compile=True"], "compile=True: Only False"),
        (["llama3_2/1B_lora", "optimizer_in_bwd=True"], "optimizer_in_backward applies to method full"),
        (["llama3_2/1B_lora", "dataset_val._component_=torchtune.datasets.alpaca_dataset"],
         "dataset_val._component_=torchtune.datasets.alpaca_dataset: validation reads the training data's"),
        (["llama3_2/1B_lora", "dataset_val._component_=torchtune.datasets.alpaca_cleaned_dataset",
          "dataset_val.train_on_input=False"], "dataset_val.train_on_input=False: validation is read like"),
        (["llama3_2/1B_lora", "dataset.filter_fn=my.fn"], "dataset.filter_fn=my.fn: A Python callable"),
        (["llama3_2/1B_lora", "model._component_=torchtune.models.llama3_2.llama3_2_1b"],
         "trains LoRA adapters"),
        (["llama3_2/1B_lora", "~nothing"], "~nothing: the config has no key nothing"),
        (["llama3_2/1B_full", "profiler.enabled=True"], "profiler.enabled=True: Only False"),
        (["llama3_2/1B_full", "dataset=torchtune.datasets.text_completion_dataset", "dataset.packed=True"],
         "split_across_pack"),
        (["llama3_2/1B_full", "dataset=torchtune.datasets.wikitext_dataset", "dataset.packed=True"],
         "wikitext_dataset cuts samples across packs"),
        (["llama3_2/1B_full", "dataset=torchtune.datasets.cnn_dailymail_articles_dataset", "~dataset.packed",
          "dataset.max_seq_len=32"], "dataset.max_seq_len=32: the llm-trainer truncates every dataset at"),
        (["llama3_2/1B_lora", "dataset=torchtune.datasets.samsum_dataset", "dataset.column_map={text: x}"],
         "samsum_dataset columns are input, output, not text"),
    ],
)  # fmt: skip
def test_what_cannot_be_honoured_is_refused_by_name(args, message, capsys, tmp_path):
    recipe = "full_finetune_distributed" if "llama3_2/1B_full" in args else "lora_finetune_distributed"
    argv = ["run", recipe, "--config", *args, f"output_dir={tmp_path}/out", "tokenizer.max_seq_len=128"]
    assert tune.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_tune_ls_and_validate(tmp_path, capsys, model_dir):
    assert tune.main(["ls"]) == 0
    listing = capsys.readouterr().out
    assert "lora_finetune_distributed" in listing and "qwen2_5/1.5B_lora" in listing and "0.6.1" in listing
    assert tune.main(["cp", "qwen2_5/1.5B_lora", str(tmp_path / "q.yaml")]) == 0
    capsys.readouterr()
    assert tune.main(["validate", str(tmp_path / "q.yaml")]) == 0
    assert "well-formed" in capsys.readouterr().out
    text = (tmp_path / "q.yaml").read_text().replace("lora_rank: 32", "lora_rnak: 32")
    (tmp_path / "bad.yaml").write_text(text)
    assert tune.main(["validate", str(tmp_path / "bad.yaml")]) == 2
    assert "did you mean model.lora_rank?" in capsys.readouterr().err


def test_trainer_settings_torchtune_needs():
    """shuffle: False, the warmup of get_cosine_schedule_with_warmup, ShareGPT messages."""
    import math

    from pkg.trainer import batching, rows
    from pkg.trainer.recipe import lr_lambda

    plan = batching.BatchPlan(10, 4, 2, 1, 0, seed=5, shuffle=False)
    assert [plan.global_batch(s) for s in (0, 1, 2)] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    assert batching.BatchPlan(10, 4, 2, 1, 0, seed=5).global_batch(0) != [0, 1, 2, 3]

    def torchtune_lambda(step: int, warmup: int = 3, total: int = 10) -> float:  # 0.6.1's formula
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))

    cfg = TrainConfig(warmup_steps=3, warmup_from_zero=True)
    factor = lr_lambda(cfg, 10)
    assert [round(factor(s), 12) for s in range(10)] == [round(torchtune_lambda(s), 12) for s in range(10)]

    sharegpt = [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "Q"},
        {"from": "gpt", "value": "A"},
    ]
    roles = [(m["role"], m["content"]) for m in rows.plain_messages(sharegpt, 0)]
    assert roles == [("system", "S"), ("user", "Q"), ("assistant", "A")]


def test_a_list_of_datasets_is_concatenated_each_with_its_builder(tmp_path, tiny_model):
    """torchtune's `dataset: [...]` (ConcatDataset): each entry keeps its builder and columns; the trainer
    tokenizes each as its own dataset and trains on all of them, in order."""
    from pkg.trainer import data, model
    from tests.trainer.tiny import rows

    alpaca, qa = tmp_path / "alpaca", tmp_path / "qa"
    questions = [{"q": r["instruction"], "a": r["output"]} for r in rows("alpaca", 7)]
    for folder, records in ((alpaca, rows("alpaca", 12)), (qa, questions)):
        folder.mkdir()
        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "mix.yaml").write_text(f"""
model:
  _component_: torchtune.models.llama3_2.llama3_2_1b
tokenizer: {{max_seq_len: 256}}
dataset:
  - _component_: torchtune.datasets.alpaca_dataset
    data_dir: {alpaca}
    train_on_input: False
  - _component_: torchtune.datasets.instruct_dataset
    data_dir: {qa}
    column_map: {{input: q, output: a}}
    new_system_prompt: Be brief.
optimizer: {{_component_: torch.optim.AdamW, lr: 1e-4}}
batch_size: 2
epochs: 1
""")  # fmt: skip
    cmd = tune.parse_command(["run", "full_finetune_distributed", "--config", str(tmp_path / "mix.yaml"),
                              f"checkpointer.checkpoint_dir={tiny_model}"])  # fmt: skip
    cfg, _ = tune.translate(cmd, 1)
    assert (cfg.dataset_dir, cfg.dataset_format, cfg.train_on_prompt) == (str(alpaca), "alpaca", False)
    assert cfg.more_datasets == [{
        "dataset_dir": str(qa), "dataset_split": "train", "dataset_source": "auto",
        "dataset_format": "input_output", "column_map": {"input": "q", "output": "a"},
        "system_prompt": "Be brief.", "empty_system_prompt": False, "train_on_prompt": False, "add_eos": True,
        "alpaca_preamble": False,
    }]  # fmt: skip
    # The trainer's own command line reads the list back (tune passes it as JSON).
    from pkg.trainer.config import load_config

    assert load_config(tune.trainer_args(cfg)) == cfg
    splits = data.build_splits(cfg, model.load_tokenizer(str(tiny_model)), str(tmp_path / "cache"))
    assert len(splits["train"]) == 12 + 7
    same = (tmp_path / "mix.yaml").read_text().replace(f"data_dir: {qa}", f"data_dir: {alpaca}")
    (tmp_path / "same.yaml").write_text(same)
    with pytest.raises(ConfigError, match=r"dataset\[1\] reads the same files as dataset\[0\]"):
        tune.translate(tune.Command([], cmd.recipe, str(tmp_path / "same.yaml"), {}), 1)


def test_text_without_eos(tiny_model):
    """text_completion_dataset's add_eos=False: the text's tokens alone."""
    from pkg.trainer import data, model

    tokenizer = model.load_tokenizer(str(tiny_model))
    rows = [{"text": "Repeat the word blue"}]
    [(with_eos, _)] = data.tokenize_non_chat_rows(rows, 0, "text", tokenizer, TrainConfig())
    [(without, labels)] = data.tokenize_non_chat_rows(rows, 0, "text", tokenizer, TrainConfig(add_eos=False))
    assert with_eos == [*without, tokenizer.eos_token_id] and len(labels) == len(without)


def test_named_builders_read_their_own_columns_from_the_dataset_folder(
    tmp_path, tiny_llama3_model, model_dir
):
    """samsum_dataset's dialogue/summary as a user and an assistant turn; wikitext_dataset's page column, from
    the subset's own folder of the Hub repository (the other subset's files are not read)."""
    from pkg.trainer import data, model

    def rows(folder: Path, items: list[dict]) -> Path:
        folder.mkdir(parents=True)
        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
        return folder

    samsum = rows(tmp_path / "samsum", [{"id": "1", "dialogue": "A: hi B: hello", "summary": "They greet."}])
    wiki = tmp_path / "wiki"
    rows(wiki / "wikitext-103-v1", [{"page": "One long page."}] * 3)
    rows(wiki / "wikitext-2-v1", [{"page": "Another page."}] * 5)
    tokenizer = model.load_tokenizer(str(tiny_llama3_model))  # llama3_2/1B_full's rows
    for builder, folder, count, fmt in (("samsum_dataset", samsum, 1, "input_output"),
                                        ("wikitext_dataset", wiki, 3, "text")):  # fmt: skip
        args = [f"checkpointer.checkpoint_dir={model_dir}", "dataset.packed=False",
                f"dataset=torchtune.datasets.{builder}", f"dataset.data_dir={folder}"]  # fmt: skip
        cmd = tune.parse_command(["run", "full_finetune_distributed", "--config", "llama3_2/1B_full", *args])
        cfg, _ = tune.translate(cmd, 1)
        cache = str(tmp_path / "cache")
        samples, got = data.tokenized_samples(cfg, tokenizer, cache, cfg.dataset_dir, "train")
        assert (len(samples), got) == (count, fmt)
    assert cfg.dataset_dir == str(wiki / "wikitext-103-v1")


def test_alpaca_rows_get_torchtunes_prompt_word_for_word(model_dir):
    """AlpacaToMessages' two fixed prompts (torchtune 0.6.1, torchtune/data/_messages.py), pinned here."""
    from pkg.trainer import rows

    cmd = tune.parse_command(["run", "lora_finetune_distributed", "--config", "llama3_2/1B_lora",
                              f"checkpointer.checkpoint_dir={model_dir}"])  # fmt: skip
    cfg, _ = tune.translate(cmd, 1)
    assert cfg.alpaca_preamble
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    assert rows.prompt_and_completion(row, "alpaca", 0, cfg.alpaca_preamble) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n",
        "5",
    )
    assert rows.prompt_and_completion({**row, "input": ""}, "alpaca", 0, cfg.alpaca_preamble)[0] == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Response:\n"
    )
    assert not TrainConfig().alpaca_preamble  # the trainer's own configs keep the short prompt


def test_disk_logger_writes_torchtunes_log_file(tmp_path, model_dir):
    """DiskLogger: log_dir/log_<unix time>.txt with DiskLogger.log_dict's lines (log_dir not given: the
    published configs' ${output_dir}/logs); StdoutLogger writes no file."""
    from pkg.trainer.config import load_config
    from pkg.trainer.metrics import Metrics

    def translated(*args: str) -> TrainConfig:
        argv = ["run", "lora_finetune_distributed", "--config", "llama3_2/1B_lora", f"output_dir={tmp_path}",
                f"checkpointer.checkpoint_dir={model_dir}", *args]  # fmt: skip
        return tune.translate(tune.parse_command(argv), 1)[0]

    assert translated().disk_log_dir == f"{tmp_path}/logs"  # llama3_2/1B_lora's DiskLogger
    assert translated(f"metric_logger._component_={LOGGING}.StdoutLogger").disk_log_dir == ""
    cfg = translated(f"metric_logger.log_dir={tmp_path}/mine")
    assert load_config(tune.trainer_args(cfg)).disk_log_dir == f"{tmp_path}/mine"
    metrics = Metrics(tmp_path, 2, True, cfg.disk_log_dir)
    metrics.train_step(1, 2.5, 3e-4, 1.25, 100.0)
    metrics.val_step(2, 2.0)
    [log_file] = (tmp_path / "mine").glob("log_*.txt")
    assert log_file.read_text() == (
        "Step 1 | loss:2.5 lr:0.0003 grad_norm:1.25 tokens_per_s:100.0 \nStep 2 | val_loss:2.0 \n"
    )
    Metrics(tmp_path / "other", 2, False, str(tmp_path / "rank1")).train_step(1, 2.5, 3e-4, 1.25, 100.0)
    assert not (tmp_path / "rank1").exists()  # rank 0 only


@pytest.mark.parametrize(
    ("template", "user"),
    [("GrammarErrorCorrectionTemplate", "Correct this to standard English: He go home.\n---\nCorrected: "),
     ("SummarizeTemplate", "Summarize this dialogue:\nHe go home.\n---\nSummary:\n")],
)  # fmt: skip
def test_tokenizer_prompt_template_wraps_user_messages(model_dir, template, user):
    """torchtune 0.6.1's two fixed PromptTemplates (torchtune/data/_prompt_templates.py), word for word."""
    from pkg.trainer import rows

    argv = ["run", "lora_finetune_distributed", "--config", "llama3_2/1B_lora", "dataset.packed=False",
            f"checkpointer.checkpoint_dir={model_dir}", "dataset=torchtune.datasets.grammar_dataset",
            f"tokenizer.prompt_template=torchtune.data.{template}"]  # fmt: skip
    cfg, _ = tune.translate(tune.parse_command(argv), 1)
    row = {"input": "He go home.", "output": "He goes home."}
    msgs = rows.conversation(row, "input_output", 0, cfg.system_message(), cfg.prompt_template)
    assert msgs == [{"role": "user", "content": user}, {"role": "assistant", "content": "He goes home."}]
