"""`tune run`: the command line the Kubeflow SDK (kubeflow==0.5.0) and the Trainer controller send.

The SDK's own function builds the args of each TorchTuneConfig; the controller's part of the command
(`tune run [--rdzv_endpoint=...] RECIPE --config CONFIG output_dir=... tokenizer.path=...
checkpointer.checkpoint_dir=...`) is put around them as the controller does. Most settings are asserted on the
translated TrainConfig; two launches check that they take effect in real workers started through PET_* only.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pkg.trainer import tune
from pkg.trainer.config import TrainConfig, field_types
from pkg.trainer.errors import ConfigError
from tests.trainer.conftest import PYTHON, finish, free_port, start, trainer_env
from tests.trainer.tiny import rows

sdk = pytest.importorskip("kubeflow.trainer.types.types")
from kubeflow.trainer.backends.kubernetes.utils import get_args_using_torchtune_config  # noqa: E402

SYSTEM_PROMPT = "Answer like a parrot: repeat, never explain."


def controller_command(recipe: str, config: str, sdk_args: list[str], out="/workspace/output", model="/m",
                       endpoint: str | None = None) -> list[str]:  # fmt: skip
    """What the Trainer controller makes of a TrainJob's `tune run` and the SDK's args."""
    launcher = [f"--rdzv_endpoint={endpoint}"] if endpoint else []
    return [
        "run", *launcher, recipe, "--config", config, f"output_dir={out}",
        "tokenizer.path=/workspace/model/original/tokenizer.model", f"checkpointer.checkpoint_dir={model}",
        *sdk_args,
    ]  # fmt: skip


def sdk_args(config, dataset_uri: str | None = "hf://org/qa/train.jsonl") -> list[str]:
    init = (
        sdk.Initializer(dataset=sdk.HuggingFaceDatasetInitializer(storage_uri=dataset_uri))
        if dataset_uri
        else None
    )
    return get_args_using_torchtune_config(config, init)


def translated(recipe: str, config: str, args: list[str], world: int = 2) -> TrainConfig:
    cfg, warnings = tune.translate(tune.parse_command(controller_command(recipe, config, args)), world)
    assert warnings == []
    return cfg


LORA = sdk.TorchTuneConfig(
    dtype=sdk.DataType.BF16,
    batch_size=2,
    epochs=2,
    loss=sdk.Loss.CEWithChunkedOutputLoss,
    peft_config=sdk.LoraConfig(
        lora_rank=4, lora_alpha=8, lora_dropout=0.0, apply_lora_to_mlp=True, use_dora=True,
        lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
    ),
    dataset_preprocess_config=sdk.TorchTuneInstructDataset(
        source=sdk.DataFormat.JSON, split="train[:25%]", train_on_input=False,
        new_system_prompt=SYSTEM_PROMPT, column_map={"input": "question", "output": "answer"},
    ),
)  # fmt: skip


@pytest.mark.fast
def test_sdk_lora_config_translates_every_setting():
    args = sdk_args(LORA)
    assert "model.lora_attn_modules=[q_proj,k_proj,v_proj,output_proj]" in args  # the SDK's own format
    cfg = translated("lora_finetune_distributed", "llama3_2/1B_lora", args)
    assert (cfg.method, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.use_dora) == (
        "lora",
        4,
        8,
        0.0,
        True,
    )
    assert cfg.lora_target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert (cfg.precision, cfg.num_epochs, cfg.micro_batch_size) == ("bf16", 2, 2)
    # per-device batch 2 x world 2 x llama3_2/1B_lora's gradient_accumulation_steps 8
    assert cfg.global_batch_size == 32
    assert cfg.dataset_dir == "/workspace/dataset/train.jsonl"
    assert (cfg.dataset_source, cfg.dataset_split) == ("json", "train[:25%]")
    assert cfg.column_map == {"input": "question", "output": "answer"}
    assert (cfg.dataset_format, cfg.system_prompt, cfg.train_on_prompt) == (
        "input_output",
        SYSTEM_PROMPT,
        False,
    )
    assert (cfg.model_dir, cfg.output_dir) == ("/m", "/workspace/output")
    # torchtune's published llama3_2/1B_lora: lr 3e-4, weight decay 0.01, 100 warmup steps, cosine
    assert (cfg.learning_rate, cfg.weight_decay, cfg.warmup_steps, cfg.lr_scheduler) == (
        3e-4,
        0.01,
        100,
        "cosine",
    )


@pytest.mark.fast
def test_sdk_qlora_full_and_unknown_configs():
    qlora = sdk.TorchTuneConfig(peft_config=sdk.LoraConfig(quantize_base=True, apply_lora_to_output=True))
    cfg = translated(
        "lora_finetune_single_device", "llama3_2/1B_qlora_single_device", sdk_args(qlora), world=1
    )
    assert (cfg.method, cfg.lora_rank, cfg.lora_alpha, cfg.precision) == ("qlora", 64, 128, "bf16")
    # The SDK's default attention modules, the config's MLP, and the output head asked for
    assert cfg.lora_target_modules == [
        "q_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head",
    ]
    assert cfg.global_batch_size == 4 * 1 * 8  # its batch 4, accumulation 8

    full = sdk.TorchTuneConfig(dtype=sdk.DataType.FP32, batch_size=3, epochs=4)
    cfg = translated("full_finetune_distributed", "qwen2_5/1.5B_full", sdk_args(full, "hf://org/qa"), world=4)
    assert (cfg.method, cfg.precision, cfg.num_epochs, cfg.micro_batch_size) == ("full", "fp32", 4, 3)
    assert cfg.global_batch_size == 3 * 4 * 1
    assert cfg.dataset_dir == "/workspace/dataset/."  # the initializer's root, as the SDK writes it
    # qwen2_5/1.5B_full of torchtune 0.6.1: lr 2e-5, no scheduler (constant), activation checkpointing,
    # split train, no clipping
    assert (cfg.learning_rate, cfg.lr_scheduler, cfg.warmup_steps) == (2e-5, "constant", 0)
    assert (cfg.activation_checkpointing, cfg.dataset_split, cfg.max_grad_norm) == (True, "train", 0.0)

    # A name torchtune 0.6.1 never had is refused (torchtune refuses it too), with the nearest names.
    lora = sdk.TorchTuneConfig(peft_config=sdk.LoraConfig(lora_rank=8))
    with pytest.raises(ConfigError, match="nearest: mistral/7B_lora"):
        translated("lora_finetune_distributed", "mistral/12B_lora", sdk_args(lora, None), world=2)


@pytest.mark.fast
def test_trainer_args_keys():
    """torchtune keys users add through TrainerArgs."""
    extra = [
        "gradient_accumulation_steps=3", "max_steps_per_epoch=5", "optimizer.lr=1e-3",
        "optimizer.weight_decay=0.1", "lr_scheduler.num_warmup_steps=2",
        "lr_scheduler._component_=torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
        "enable_activation_checkpointing=True", "seed=7", "clip_grad_norm=0.5",
        "resume_from_checkpoint=False", "tokenizer.max_seq_len=256", "dataset.packed=True",
    ]  # fmt: skip
    cfg = translated("full_finetune_distributed", "llama3_2/1B_full", ["batch_size=2", *extra], world=2)
    assert cfg.global_batch_size == 2 * 2 * 3 and cfg.max_steps_per_epoch == 5
    assert (cfg.learning_rate, cfg.weight_decay, cfg.warmup_steps, cfg.lr_scheduler) == (
        1e-3,
        0.1,
        2,
        "cosine",
    )
    assert (cfg.activation_checkpointing, cfg.seed, cfg.max_grad_norm, cfg.resume) == (True, 7, 0.5, "never")
    assert (cfg.max_seq_length, cfg.packing) == (256, True)
    cfg = translated(
        "full_finetune_distributed",
        "llama3_2/1B_full",
        ["clip_grad_norm=null", "resume_from_checkpoint=True"],
    )
    assert (cfg.max_grad_norm, cfg.resume) == (0.0, "auto")


@pytest.mark.fast
def test_cosmetic_keys_warn_once_each():
    extra = ["log_level=DEBUG", "device=cpu", "optimizer.fused=False", "profiler.wait_steps=2"]
    argv = controller_command("lora_finetune_distributed", "llama3_2/1B_lora", extra)
    _, warnings = tune.translate(tune.parse_command(argv), 1)
    assert len(warnings) == 3  # the profiler's settings do nothing while it is off: honoured as they are
    assert all("has no effect in the llm-trainer" in w for w in warnings)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["optimizer.lrr=1e-4"], "unknown torchtune key 'optimizer.lrr': did you mean optimizer.lr?"),
        (["model.lora_rnak=8"], "did you mean model.lora_rank?"),
        (["bach_size=2"], "did you mean batch_size?"),
        (["dtype=fp16"], "dtype=fp16: expected one of bf16, fp32"),
        (["batch_size=two"], "batch_size=two: expected an integer"),
        (
            ["model.lora_attn_modules=[q_proj,query]"],
            "query is not one of q_proj, k_proj, v_proj, output_proj",
        ),
        (["dataset.split=train[:ten]"], "dataset.split=train[:ten]"),
        (["dataset.column_map={'prompt': 'q'}"], "columns are instruction, input, output, not prompt"),
        (["model.lora_rank=0"], "model.lora_rank=0: lora_rank must be > 0"),
        (["batch_size=0"], "batch_size=0: must be >= 1"),
        (["model.lora_dropout=1.5"], "model.lora_dropout=1.5: lora_dropout must be in [0, 1)"),
        (["loss=torch.nn.MSELoss"], "loss._component_=torch.nn.MSELoss: expected one of"),
    ],
)
def test_typos_and_bad_values_are_refused_in_one_line(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    argv = controller_command("lora_finetune_distributed", "llama3_2/1B_lora", extra, out=str(out))
    assert tune.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not out.exists()


def test_a_typo_exits_2_in_one_line_without_starting_anything(tmp_path):
    """The whole process, as the container runs it: one line, exit 2, no traceback, no output_dir."""
    out = tmp_path / "out"
    argv = controller_command("lora_finetune_distributed", "llama3_2/1B_lora", ["epoch=3"], out=str(out))
    result = run_tune(argv, timeout=120, nproc_per_node="2", nnodes="1", node_rank="0")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: unknown torchtune key 'epoch': did you mean epochs? "
        "(docs/trainer.md lists the keys tune run reads)"
    )
    assert not out.exists() and "Traceback" not in result.stdout


@pytest.mark.fast
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "lora_finetune_distribute", "--config", "a/b"], "did you mean lora_finetune_distributed?"),
        (
            ["run", "--nproc_per_nod=2", "full_finetune_distributed", "--config", "a/b"],
            "did you mean --nproc_per_node?",
        ),
        (["run", "full_finetune_distributed"], "--config CONFIG is missing"),
        (["run", "full_finetune_distributed", "--config", "a/b", "epochs"], "overrides are key=value"),
        (["lss"], "usage: tune run"),
        (
            ["run", "full_finetune_distributed", "--config", "llama3_2/1B_full", "model.lora_rank=8"],
            "trains all weights",
        ),
    ],
)
def test_bad_command_lines(capsys, argv, message):
    assert tune.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


@pytest.mark.fast
def test_dpo_recipes():
    argv = controller_command("lora_dpo_distributed", "llama3_1/8B_lora_dpo", [])
    if "objective" in field_types():
        cfg, _ = tune.translate(tune.parse_command(argv), 1)
        assert (cfg.objective, cfg.method) == ("dpo", "lora")
    else:
        with pytest.raises(ConfigError, match="preference training"):
            tune.translate(tune.parse_command(argv), 1)


@pytest.mark.fast
def test_launcher_reads_pet_variables(monkeypatch):
    cmd = tune.parse_command(controller_command("full_finetune_distributed", "a/b", []))
    monkeypatch.setenv("PET_NPROC_PER_NODE", "auto")
    monkeypatch.setenv("PET_NNODES", "1")
    args = tune.launch_args(cmd)
    assert args.nproc_per_node == "1" and args.standalone  # no GPU: one process, not one per CPU
    monkeypatch.setenv("PET_NNODES", "2")
    with pytest.raises(ConfigError, match="rdzv_endpoint"):
        tune.launch_args(cmd)
    cmd = tune.parse_command(
        controller_command("full_finetune_distributed", "a/b", [], endpoint="host-0.job:29500")
    )
    args = tune.launch_args(cmd)
    assert (args.rdzv_endpoint, args.nnodes, args.standalone) == ("host-0.job:29500", "2", False)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi3", "phi", "opt", "gpt_neox"])
def test_layer_names_exist_in_each_architecture(tmp_path, model_type):
    """torchtune's q/k/v/output_proj, MLP and output names map onto modules the model really has."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                                  ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64,
                                  pad_token_id=0, bos_token_id=0, eos_token_id=1)  # fmt: skip
    config.save_pretrained(tmp_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = tune.lora_targets(
        {"model.lora_attn_modules": list(tune.ATTENTION), "model.apply_lora_to_mlp": True,
         "model.apply_lora_to_output": True}, str(tmp_path),
    )  # fmt: skip
    assert set(targets) <= linear, f"{model_type}: {sorted(set(targets) - linear)} not in {sorted(linear)}"


# ---------------------------------------------------------------- real launches


def qa_dataset(path: Path, n: int = 64) -> Path:
    """Rows with the column names of a user's own dataset (question/answer), as one jsonl file."""
    path.mkdir(parents=True, exist_ok=True)
    data = [{"question": r["instruction"], "answer": r["output"]} for r in rows("alpaca", n)]
    (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


def run_tune(argv: list[str], timeout: int = 300, **pet: str) -> subprocess.CompletedProcess:
    env = trainer_env(**{f"PET_{k.upper()}": v for k, v in pet.items()})
    return finish(start([PYTHON, "-m", "pkg.trainer.tune", *argv], env), timeout)


def test_sdk_lora_runs_on_two_processes_through_pet_only(tmp_path, tiny_llama3_model):
    """The LORA TorchTuneConfig, launched with PET_NPROC_PER_NODE=2 and no launcher flag."""
    data = qa_dataset(tmp_path / "dataset")
    args = [*sdk_args(LORA), "gradient_accumulation_steps=2"]  # TrainerArgs: a smaller global batch
    args = [a.replace("/workspace/dataset", str(data)) for a in args]
    out = tmp_path / "out"
    argv = controller_command(
        "lora_finetune_distributed", "llama3_2/1B_lora", args, str(out), str(tiny_llama3_model)
    )
    result = run_tune(argv, nproc_per_node="2", nnodes="1", node_rank="0")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]

    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["use_dora"]) == (4, 8, True)
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}  # fmt: skip
    # torchtune's layout too: epoch_1/ (the last of 2 epochs) holds the adapter (peft) and, as
    # save_adapter_weights_only is False, the merged model, as hard links to the same files.
    epoch = out / "epoch_1"
    for name, folder in (("adapter_model.safetensors", "adapter"), ("adapter_config.json", "adapter"),
                         ("config.json", "model"), ("model.safetensors", "model")):  # fmt: skip
        assert (epoch / name).stat().st_ino == (out / folder / name).stat().st_ino, name
    summary = json.loads((out / "summary.json").read_text())
    # train[:25%] of 64 rows = 16; global batch 2 per device x 2 processes x 2 = 8; 2 epochs -> 4 steps
    assert (summary["world_size"], summary["total_steps"], summary["steps"]) == (2, 4, 4)
    saved = (out / "config.yaml").read_text()
    assert "precision: bf16" in saved and "global_batch_size: 8" in saved

    from transformers import AutoTokenizer

    from pkg.trainer.data_cache import read_cache
    from pkg.trainer.loss import IGNORE_INDEX

    (cache,) = (out / "cache").glob("tokenized-*")
    train = read_cache(cache)["train"]
    assert len(train) == 16  # the split's slice
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama3_model)
    record = train[0]
    text = tokenizer.decode(record["input_ids"])
    # As torchtune's Llama3Tokenizer renders them: the system prompt and the mapped question are the prompt
    # (not trained on); the answer's header, the answer and <|eot_id|> are the target.
    h, e = "<|start_header_id|>", "<|end_header_id|>\n\n"
    assert text.startswith(
        f"<|begin_of_text|>{h}system{e}{SYSTEM_PROMPT}<|eot_id|>{h}user{e}Repeat the word "
    ), text
    target = tokenizer.decode([t for t in record["labels"] if t != IGNORE_INDEX])
    assert target.startswith(f"{h}assistant{e}") and target.endswith("<|eot_id|>"), target
    assert SYSTEM_PROMPT not in target and "Repeat" not in target
    # Katib's StdOut collector reads name=value pairs from the progress lines.
    assert any("step 4/4 | loss=" in line and "grad_norm=" in line for line in result.stdout.splitlines())
    # llama3_2/1B_lora's DiskLogger (log_dir ${output_dir}/logs): torchtune's file, one line per step.
    [disk_log] = (out / "logs").glob("log_*.txt")
    lines = disk_log.read_text().splitlines()
    assert lines[-1].startswith("Step 4 | loss:") and " lr:" in lines[-1], lines


def test_two_nodes_full_fp32(tmp_path, tiny_llama3_model):
    """Two `tune run --rdzv_endpoint=127.0.0.1:PORT` launches, PET_NNODES=2 and node ranks 0 and 1."""
    data = qa_dataset(tmp_path / "dataset", n=32)
    out = tmp_path / "out"
    args = sdk_args(sdk.TorchTuneConfig(dtype=sdk.DataType.FP32, batch_size=2, epochs=1), None)
    args += [f"dataset.data_dir={data}", "dataset=torchtune.datasets.instruct_dataset",
             "dataset.column_map={'input': 'question', 'output': 'answer'}", "dataset.split=train",
             "enable_activation_checkpointing=False", "gradient_accumulation_steps=4",
             # validation on its own data: the same builder and columns, its own split
             "dataset_val._component_=torchtune.datasets.instruct_dataset", "dataset_val.split=train[:8]",
             "dataset_val.column_map={'input': 'question', 'output': 'answer'}",
             "run_val_every_n_steps=1"]  # fmt: skip
    endpoint = f"127.0.0.1:{free_port()}"
    argv = controller_command("full_finetune_distributed", "llama3_2/1B_full", args, str(out),
                              str(tiny_llama3_model), endpoint=endpoint)  # fmt: skip
    nodes = []
    for rank in (0, 1):
        env = trainer_env(PET_NNODES="2", PET_NPROC_PER_NODE="1", PET_NODE_RANK=str(rank))
        nodes.append(start([PYTHON, "-m", "pkg.trainer.tune", *argv], env))
    results = [finish(node, 300) for node in nodes]
    for result in results:
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    val_lines = [line for line in results[0].stdout.splitlines() if "val_loss=" in line]
    assert len(val_lines) == 2, results[0].stdout[-3000:]  # after each of the 2 steps
    summary = json.loads((out / "summary.json").read_text())
    # 32 rows / (2 per device x 2 nodes x accumulation 4)
    assert summary["world_size"] == 2 and summary["method"] == "full"
    assert summary["total_steps"] == 32 // (2 * 2 * 4)
    weights = sorted(p.name for p in (out / "model").glob("*.safetensors"))
    assert weights and sorted(p.name for p in (out / "epoch_0").glob("*.safetensors")) == weights
    assert (out / "epoch_0" / "config.json").stat().st_ino == (out / "model" / "config.json").stat().st_ino
    assert "precision: fp32" in (out / "config.yaml").read_text()


def test_readme_configmap_config_file_from_the_sdk(tmp_path, capsys):
    """README's SDK example: the options put `tune run --config /etc/tune/FILE` and the ConfigMap mount on the
    node; a `tune cp` file edited by the user is what that command runs (no cluster: the SDK's own option
    objects applied to a TrainJob spec)."""
    from kubeflow.trainer import CustomTrainerContainer
    from kubeflow.trainer.backends.kubernetes.backend import KubernetesBackend
    from kubeflow.trainer.options import (
        ContainerPatch,
        JobSetSpecPatch,
        JobSetTemplatePatch,
        JobSpecPatch,
        JobTemplatePatch,
        PodSpecPatch,
        PodTemplatePatch,
        ReplicatedJobPatch,
        RuntimePatch,
        TrainerCommand,
        TrainingRuntimeSpecPatch,
    )  # fmt: skip

    mount = PodSpecPatch(
        volumes=[{"name": "tune-config", "configMap": {"name": "my-tune-config"}}],
        containers=[
            ContainerPatch(name="node", volume_mounts=[{"name": "tune-config", "mountPath": "/etc/tune"}])
        ],
    )
    command = ["tune", "run", "lora_finetune_distributed", "--config", "/etc/tune/my_lora.yaml"]
    options = [
        TrainerCommand(command),
        RuntimePatch(training_runtime_spec=TrainingRuntimeSpecPatch(template=JobSetTemplatePatch(
            spec=JobSetSpecPatch(replicated_jobs=[ReplicatedJobPatch(name="node", template=JobTemplatePatch(
                spec=JobSpecPatch(template=PodTemplatePatch(spec=mount))))])))),
    ]  # fmt: skip
    spec: dict = {}
    backend = KubernetesBackend.__new__(KubernetesBackend)
    for option in options:
        option(spec, CustomTrainerContainer(image="llm-trainer", num_nodes=1), backend)
    assert spec["spec"]["trainer"]["command"] == command
    [patch] = spec["spec"]["runtimePatches"]
    [job] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = job["template"]["spec"]["template"]["spec"]
    assert pod["volumes"][0]["configMap"] == {"name": "my-tune-config"}
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/etc/tune"

    # The file: `tune cp`, edited, then the command above (the mount is tmp_path here).
    assert tune.main(["cp", "qwen2_5/1.5B_lora", str(tmp_path / "my_lora.yaml")]) == 0
    text = (tmp_path / "my_lora.yaml").read_text()
    (tmp_path / "my_lora.yaml").write_text(
        text.replace("lora_rank: 32", "lora_rank: 12").replace("lr: 2e-5", "lr: 7e-5")
    )
    argv = [a.replace("/etc/tune", str(tmp_path)) for a in command[1:]]
    cfg, warnings = tune.translate(tune.parse_command(argv), 1)
    assert (cfg.lora_rank, cfg.learning_rate, warnings) == (12, 7e-5, [])
    assert (cfg.model_dir, cfg.output_dir, cfg.dataset_dir) == (
        "/workspace/model",
        "/workspace/output",
        "/workspace/dataset",
    )


def test_a_llama2_config_trains_on_rows_in_llama2s_own_format(tmp_path, tiny_model, alpaca_data, monkeypatch):
    """tune run's settings for llama2/7B_lora (llama2_tokenizer, alpaca_dataset), trained in this process: the
    samples are torchtune's Llama2Tokenizer rendering (BOS, [INST] ... [/INST], the response, EOS)."""
    from pkg.trainer import data_cache
    from pkg.trainer.__main__ import main
    from pkg.trainer.model import load_tokenizer

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    argv = ["run", "lora_finetune_distributed", "--config", "llama2/7B_lora", f"output_dir={tmp_path}",
            f"checkpointer.checkpoint_dir={tiny_model}", "checkpointer.checkpoint_files=[model.safetensors]",
            f"dataset.data_dir={alpaca_data}", "epochs=1", "max_steps_per_epoch=2", "batch_size=4",
            "tokenizer.max_seq_len=256"]  # fmt: skip
    cfg, _ = tune.translate(tune.parse_command(argv), 1)
    assert (cfg.message_format, cfg.prompt_template) == ("llama2", "llama2_chat")
    assert main(tune.trainer_args(cfg)) == 0
    [cache] = (tmp_path / "cache").glob("tokenized-*")
    record = data_cache.read_cache(cache)["train"][0]
    text = load_tokenizer(str(tiny_model)).decode(record["input_ids"])
    # each piece encoded apart, without its trailing spaces (this byte-level vocabulary has no dummy prefix)
    assert text.startswith("<s>[INST]Below is an instruction") and text.endswith("</s>")
    assert "### Response:\n [/INST]" in text
