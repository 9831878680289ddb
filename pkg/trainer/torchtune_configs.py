"""torchtune's published defaults per config name (`tune run RECIPE --config NAME`), as numbers.

A TorchTuneConfig of the Kubeflow SDK only sends what the user set; everything else comes from the config
file torchtune ships under that name. These are the numbers of those files (pytorch/torchtune at its last
release, recipes/configs/), the ones that change what a run does here. A name not listed gets our defaults.

Columns: learning rate; AdamW weight decay (torch's default 0.01 where the file names none); warmup steps
(`-`: no scheduler, a constant learning rate); gradient accumulation steps; batch size per device; epochs;
max steps per epoch (0: no cap); activation checkpointing; dataset split; LoRA as rank/alpha/dropout, `mlp`
when the MLP is adapted and `out` when the output head is, `4bit` for a quantized base (QLoRA) and `dora`
for DoRA (`-` for full fine-tuning). Every LoRA config adapts q_proj, v_proj and output_proj.
"""

from __future__ import annotations

from dataclasses import dataclass

PUBLISHED = """
gemma/2B_full                       2e-05   0.01  -    1  2  1  0     yes  train[:95%]  -
gemma/2B_lora                       2e-05   0.01  10   1  4  1  0     yes  train[:95%]  64/128/0/mlp/-
gemma/2B_lora_single_device         2e-05   0.01  10   8  4  1  0     yes  train        64/128/0/mlp/-
gemma/2B_qlora_single_device        2e-05   0.01  10   8  4  1  0     yes  train        64/128/0/mlp/-/4bit
gemma/7B_full                       2e-05   0.01  -    1  1  1  0     yes  train[:95%]  -
gemma/7B_lora                       2e-05   0.01  10   1  4  1  0     yes  train[:95%]  64/128/0/mlp/-
gemma/7B_lora_single_device         5e-05   0.01  10   8  8  1  0     yes  train        8/16/0/mlp/-
gemma/7B_qlora_single_device        2e-05   0.01  10   8  4  1  0     yes  train        64/128/0/mlp/-/4bit
gemma2/27B_full                     2e-05   0.01  -    1  1  1  0     yes  train[:95%]  -
gemma2/27B_lora                     2e-05   0.01  10   1  4  1  0     yes  train[:95%]  64/128/0/mlp/-
gemma2/27B_lora_single_device       5e-05   0.01  10   8  2  1  0     yes  train        8/16/0/mlp/-
gemma2/27B_qlora_single_device      2e-05   0.01  10   8  4  1  0     yes  train        64/128/0/mlp/-/4bit
gemma2/2B_full                      2e-05   0.01  -    1  2  1  0     yes  train[:95%]  -
gemma2/2B_lora                      2e-05   0.01  10   1  4  1  0     yes  train[:95%]  64/128/0/mlp/-
gemma2/2B_lora_single_device        2e-05   0.01  10   8  8  1  0     yes  train        64/128/0/mlp/-
gemma2/2B_qlora_single_device       2e-05   0.01  10   8  4  1  0     yes  train        64/128/0/mlp/-/4bit
gemma2/9B_full                      2e-05   0.01  -    1  1  1  0     yes  train[:95%]  -
gemma2/9B_lora                      2e-05   0.01  10   1  4  1  0     yes  train[:95%]  64/128/0/mlp/-
gemma2/9B_lora_single_device        5e-05   0.01  10   8  8  1  0     yes  train        8/16/0/mlp/-
gemma2/9B_qlora_single_device       2e-05   0.01  10   8  4  1  0     yes  train        64/128/0/mlp/-/4bit
llama2/13B_full                     2e-05   0.01  -    1  2  1  0     yes  train[:95%]  -
llama2/13B_lora                     0.0002  0.01  100  8  2  1  0     no   train[:95%]  8/16/0/mlp/out
llama2/13B_qlora_single_device      0.0003  0.01  100  8  2  1  0     yes  train        8/16/0/mlp/-/4bit
llama2/70B_lora                     0.0003  0.01  100  1  2  1  0     yes  train[:95%]  16/32/0/mlp/-
llama2/70B_qlora                    0.0003  0.01  100  1  2  1  0     yes  train[:95%]  16/32/0/mlp/-/4bit
llama2/7B_full                      2e-05   0.01  -    1  2  1  0     yes  train[:95%]  -
llama2/7B_full_low_memory           1e-05   0.01  100  1  2  1  0     yes  train        -
llama2/7B_lora                      0.0003  0.01  100  8  2  1  0     no   train[:95%]  8/16/0/mlp/-
llama2/7B_lora_dpo                  0.0005  0.05  100  8  4  1  1000  yes  train        8/16/0/mlp/-
llama2/7B_lora_dpo_single_device    0.0005  0.05  100  8  4  1  1000  yes  train        8/16/0/mlp/-
llama2/7B_lora_single_device        0.0003  0.01  100  8  2  1  0     yes  train        8/16/0/mlp/-
llama2/7B_qlora                     0.0003  0.01  100  8  2  1  0     yes  train[:95%]  8/16/0/mlp/-/4bit
llama2/7B_qlora_single_device       0.0003  0.01  100  8  2  1  0     yes  train        8/16/0/mlp/-/4bit
llama3/70B_full                     2e-05   0.01  -    1  2  1  0     yes  train[:95%]  -
llama3/70B_lora                     0.0003  0.01  100  1  2  1  0     yes  train[:95%]  16/32/0/mlp/-
llama3/8B_dora                      0.0003  0.01  100  1  2  1  0     no   train        8/16/0/mlp/-/dora
llama3/8B_dora_single_device        0.0003  0.01  100  8  2  1  0     yes  train        8/16/0/mlp/-/dora
llama3/8B_full                      2e-05   0.01  -    1  2  1  0     yes  train[:95%]  -
llama3/8B_full_single_device        1e-05   0.01  100  1  2  1  0     yes  train        -
llama3/8B_lora                      0.0003  0.01  100  8  2  1  0     no   train[:95%]  8/16/0/mlp/-
llama3/8B_lora_single_device        0.0003  0.01  100  8  2  1  0     yes  train        8/16/0/mlp/-
llama3/8B_qdora_single_device       0.0003  0.01  100  8  2  1  0     yes  train        8/16/0/mlp/-/4bit/dora
llama3/8B_qlora_single_device       0.0003  0.01  100  8  2  1  0     yes  train        8/16/0/mlp/-/4bit
llama3_1/405B_qlora                 0.0003  0.01  100  8  1  1  0     yes  train[:95%]  16/32/0/mlp/-/4bit
llama3_1/70B_full                   2e-05   0.01  -    1  2  1  0     yes  train[:95%]  -
llama3_1/70B_lora                   0.0003  0.01  100  1  2  1  0     yes  train[:95%]  16/32/0/mlp/-
llama3_1/8B_full                    2e-05   0.01  -    1  2  1  0     yes  train[:95%]  -
llama3_1/8B_full_dpo                2e-05   0.05  20   8  4  1  1000  yes  train        -
llama3_1/8B_full_single_device      2e-05   0.01  -    1  2  1  0     yes  train        -
llama3_1/8B_lora                    0.0003  0.01  100  8  2  1  0     no   train[:95%]  8/16/0/mlp/-
llama3_1/8B_lora_dpo                0.0005  0.05  100  8  4  1  1000  yes  train        8/16/0/mlp/-
llama3_1/8B_lora_dpo_single_device  0.0005  0.05  100  8  4  1  1000  yes  train        8/16/0/mlp/-
llama3_1/8B_lora_single_device      0.0003  0.01  100  8  2  1  0     yes  train        8/16/0/mlp/-
llama3_1/8B_qlora_single_device     0.0003  0.01  100  8  2  1  0     yes  train        8/16/0/mlp/-/4bit
llama3_2/1B_full                    2e-05   0.01  -    8  4  1  0     no   train[:95%]  -
llama3_2/1B_full_single_device      2e-05   0.01  -    1  4  1  0     no   train        -
llama3_2/1B_lora                    0.0003  0.01  100  8  4  1  0     no   train[:95%]  64/128/0/mlp/-
llama3_2/1B_lora_single_device      0.0003  0.01  100  8  4  1  0     no   train        64/128/0/mlp/-
llama3_2/1B_qlora_single_device     0.0003  0.01  100  8  4  1  0     no   train        64/128/0/mlp/-/4bit
llama3_2/3B_full                    2e-05   0.01  -    8  4  1  0     yes  train[:95%]  -
llama3_2/3B_full_single_device      2e-05   0.01  -    1  4  1  0     yes  train        -
llama3_2/3B_lora                    0.0003  0.01  100  8  4  1  0     no   train[:95%]  64/128/0/mlp/-
llama3_2/3B_lora_single_device      0.0003  0.01  100  8  4  1  0     yes  train        64/128/0/mlp/-
llama3_2/3B_qlora_single_device     0.0003  0.01  100  8  4  1  0     yes  train        64/128/0/mlp/-/4bit
llama3_3/70B_full                   2e-05   0.01  -    1  2  1  0     yes  train[:95%]  -
llama3_3/70B_full_multinode         2e-05   0.01  -    1  4  1  0     yes  train[:95%]  -
llama3_3/70B_lora                   0.0003  0.01  100  1  2  1  0     yes  train[:95%]  16/32/0/mlp/-
llama3_3/70B_qlora                  0.0003  0.01  100  1  2  1  0     yes  train[:95%]  16/32/0/mlp/-/4bit
mistral/7B_full                     5e-06   0.01  -    1  2  1  0     yes  train[:95%]  -
mistral/7B_full_low_memory          5e-06   0.01  -    1  2  1  0     yes  train        -
mistral/7B_lora                     2e-05   0.01  100  1  4  1  0     yes  train[:95%]  64/16/0/mlp/out
mistral/7B_lora_single_device       2e-05   0.01  100  8  4  1  0     yes  train        64/16/0/mlp/out
mistral/7B_qlora_single_device      2e-05   0.01  100  8  4  1  0     yes  train        64/16/0/mlp/-/4bit
phi3/mini_full                      5e-06   0.01  -    8  2  1  0     yes  train[:95%]  -
phi3/mini_full_low_memory           5e-06   0.01  -    1  2  1  0     yes  train        -
phi3/mini_lora                      0.0003  0.01  100  8  2  1  0     no   train[:95%]  8/16/0/mlp/-
phi3/mini_lora_single_device        0.0003  0.01  100  8  2  1  0     yes  train        8/16/0/mlp/-
phi3/mini_qlora_single_device       0.0003  0.01  100  8  2  1  0     yes  train        8/16/0/mlp/-/4bit
phi4/14B_full                       5e-06   0.01  -    8  2  1  0     yes  train[:95%]  -
phi4/14B_full_low_memory            5e-06   0.01  -    1  2  1  0     yes  train        -
phi4/14B_lora                       0.0003  0.01  100  8  2  1  0     no   train[:95%]  8/16/0/mlp/-
phi4/14B_lora_single_device         0.0003  0.01  100  8  2  1  0     yes  train        8/16/0/mlp/-
phi4/14B_qlora_single_device        0.0003  0.01  100  8  2  1  0     yes  train        8/16/0/mlp/-/4bit
qwen2/0.5B_full                     2e-05   0.01  -    8  2  1  0     no   train[:95%]  -
qwen2/0.5B_full_single_device       2e-05   0.01  -    8  2  1  0     yes  train        -
qwen2/0.5B_lora                     0.002   0.01  100  8  4  1  0     yes  train[:95%]  32/64/0/mlp/-
qwen2/0.5B_lora_single_device       0.002   0.01  100  8  4  1  0     yes  train        32/64/0/mlp/-
qwen2/1.5B_full                     2e-05   0.01  -    1  2  1  0     no   train[:95%]  -
qwen2/1.5B_full_single_device       2e-05   0.01  -    1  2  1  0     yes  train        -
qwen2/1.5B_lora                     2e-05   0.01  100  8  2  1  0     yes  train[:95%]  32/64/0/mlp/-
qwen2/1.5B_lora_single_device       0.002   0.01  100  8  2  1  0     yes  train        32/64/0/mlp/-
qwen2/7B_full                       5e-06   0.01  -    8  2  1  0     yes  train[:95%]  -
qwen2/7B_full_single_device         5e-06   0.01  -    1  2  1  0     yes  train        -
qwen2/7B_lora                       0.0003  0.01  100  8  2  1  0     no   train[:95%]  8/16/0/mlp/-
qwen2/7B_lora_single_device         0.0003  0.01  100  8  2  1  0     yes  train        8/16/0/mlp/-
qwen2_5/0.5B_full                   2e-05   0.01  -    8  2  1  0     no   train[:95%]  -
qwen2_5/0.5B_full_single_device     2e-05   0.01  -    8  2  1  0     no   train        -
qwen2_5/0.5B_lora                   0.002   0.01  100  8  2  1  0     no   train[:95%]  32/64/0/mlp/-
qwen2_5/0.5B_lora_single_device     0.002   0.01  100  8  2  1  0     no   train        32/64/0/mlp/-
qwen2_5/1.5B_full                   2e-05   0.01  -    1  2  1  0     yes  train[:95%]  -
qwen2_5/1.5B_full_single_device     2e-05   0.01  -    1  4  1  0     yes  train        -
qwen2_5/1.5B_lora                   2e-05   0.01  100  8  2  1  0     no   train[:95%]  32/64/0/mlp/-
qwen2_5/1.5B_lora_single_device     0.002   0.01  100  8  2  1  0     no   train        32/64/0/mlp/-
qwen2_5/14B_lora_single_device      0.0003  0.01  100  8  2  1  0     yes  train        8/16/0/mlp/-
qwen2_5/32B_lora                    0.0003  0.01  100  8  2  1  0     no   train[:95%]  8/16/0/mlp/-
qwen2_5/3B_full                     5e-06   0.01  -    8  2  1  0     yes  train[:95%]  -
qwen2_5/3B_full_single_device       5e-06   0.01  -    1  2  1  0     yes  train        -
qwen2_5/3B_lora                     0.0003  0.01  100  8  2  1  0     no   train[:95%]  8/16/0/mlp/-
qwen2_5/3B_lora_single_device       0.0003  0.01  100  8  2  1  0     yes  train        8/16/0/mlp/-
qwen2_5/72B_lora                    0.0003  0.01  100  1  2  1  0     yes  train[:95%]  8/16/0/mlp/-
qwen2_5/7B_full                     5e-06   0.01  -    8  2  1  0     yes  train[:95%]  -
qwen2_5/7B_full_single_device       5e-06   0.01  -    1  2  1  0     yes  train        -
qwen2_5/7B_lora                     0.0003  0.01  100  8  2  1  0     no   train[:95%]  8/16/0/mlp/-
qwen2_5/7B_lora_single_device       0.0003  0.01  100  8  2  1  0     yes  train        8/16/0/mlp/-
qwen3/0.6B_full                     2e-05   0.01  -    8  2  1  0     no   train        -
qwen3/0.6B_full_single_device       2e-05   0.01  -    8  2  1  0     no   train        -
qwen3/0.6B_lora                     0.0001  0.01  100  8  2  1  0     no   train        32/64/0/mlp/-
qwen3/0.6B_lora_single_device       0.0001  0.01  100  8  2  1  0     no   train        32/64/0/mlp/-
qwen3/1.7B_full                     2e-05   0.01  -    1  2  1  0     no   train        -
qwen3/1.7B_full_single_device       2e-05   0.01  -    1  4  1  0     no   train        -
qwen3/1.7B_lora                     2e-05   0.01  100  8  2  1  0     no   train        32/64/0/mlp/-
qwen3/1.7B_lora_single_device       0.0001  0.01  100  8  2  1  0     no   train        32/64/0/mlp/-
qwen3/14B_lora_single_device        0.0003  0.01  100  8  2  1  0     yes  train        8/16/0/mlp/-
qwen3/32B_lora                      0.0003  0.01  100  8  2  1  0     no   train        8/16/0/mlp/-
qwen3/4B_full                       5e-06   0.01  -    8  2  1  0     yes  train        -
qwen3/4B_full_single_device         2e-05   0.01  -    1  2  1  0     yes  train        -
qwen3/4B_lora                       0.0003  0.01  100  8  2  1  0     no   train        8/16/0/mlp/-
qwen3/4B_lora_single_device         0.0003  0.01  100  8  2  1  0     yes  train        8/16/0/mlp/-
qwen3/8B_full                       5e-06   0.01  -    8  2  1  0     yes  train        -
qwen3/8B_full_single_device         5e-06   0.01  -    1  2  1  0     yes  train        -
qwen3/8B_lora                       0.0003  0.01  100  8  2  1  0     no   train        8/16/0/mlp/-
qwen3/8B_lora_single_device         0.0003  0.01  100  8  2  1  0     yes  train        8/16/0/mlp/-
"""


@dataclass(frozen=True)
class Published:
    """The defaults of one torchtune config."""

    learning_rate: float
    weight_decay: float
    warmup_steps: int | None  # None: no scheduler (constant learning rate)
    gradient_accumulation_steps: int
    batch_size: int
    epochs: int
    max_steps_per_epoch: int
    activation_checkpointing: bool
    split: str
    lora: tuple[int, int, float] | None  # rank, alpha, dropout; None for full fine-tuning
    lora_mlp: bool = False
    lora_output: bool = False
    quantize_base: bool = False
    use_dora: bool = False


def _row(fields: list[str]) -> Published:
    lr, wd, warmup, accum, batch, epochs, per_epoch, ckpt, split, lora = fields
    flags: set[str] = set()
    adapter = None
    if lora != "-":
        rank, alpha, dropout, *rest = lora.split("/")
        adapter, flags = (int(rank), int(alpha), float(dropout)), set(rest)
    return Published(
        float(lr), float(wd), None if warmup == "-" else int(warmup), int(accum), int(batch), int(epochs),
        int(per_epoch), ckpt == "yes", split, adapter,
        "mlp" in flags, "out" in flags, "4bit" in flags, "dora" in flags,
    )  # fmt: skip


CONFIGS: dict[str, Published] = {
    line.split()[0]: _row(line.split()[1:]) for line in PUBLISHED.strip().splitlines()
}
