"""model/ is streamed one weight at a time (export.py, safetensors_stream.py) and still holds what
`save_pretrained` writes: the same files, shards, index, configs and tensors, loadable with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pkg.trainer import export
from pkg.trainer.safetensors_stream import INDEX_NAME, StreamReader, StreamWriter
from tests.trainer.tiny import make_tiny_model

pytestmark = pytest.mark.fast  # in-process unit tests: make test-fast


def make_model(path: Path, tied: bool, dtype: torch.dtype = torch.float32) -> Path:
    from transformers import AutoConfig, LlamaForCausalLM

    make_tiny_model(path)
    config = AutoConfig.from_pretrained(path)
    config.tie_word_embeddings = tied
    torch.manual_seed(3)
    LlamaForCausalLM(config).to(dtype).save_pretrained(str(path), safe_serialization=True)
    return path


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def same_folder(got: Path, want: Path) -> None:
    """Same file names, configs and index; the same tensors (names, dtypes, values)."""
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
    for name in ("config.json", "generation_config.json", INDEX_NAME):
        if (want / name).exists():
            assert json.loads((got / name).read_text()) == json.loads((want / name).read_text()), name
    a, b = tensors(got), tensors(want)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_model_equals_save_pretrained(tmp_path, tied, dtype, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = make_model(tmp_path / "base", tied, dtype)
    trained = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    reference = tmp_path / "reference"
    trained.to(dtype).save_pretrained(str(reference))
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(str(reference))
    trained.float()

    def whole(*_args, **_kwargs):
        raise AssertionError("the streamed export must not gather the whole model")

    monkeypatch.setattr(export, "gather_state_dict", whole)
    export.save_full(trained, str(model_dir), tmp_path / "out" / "model", is_main=True)
    same_folder(tmp_path / "out" / "model", reference)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied


def test_shards_and_index_equal_save_pretrained(tmp_path):
    """A model larger than max_shard_size: the same shard files and index as save_pretrained."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_model(tmp_path / "base", tied=False))
    model.save_pretrained(str(tmp_path / "reference"), max_shard_size="100KB")
    state = {k: model.state_dict()[k] for k in export.saved_names(model)}
    layout = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    out = tmp_path / "out"
    out.mkdir()
    writer = StreamWriter(out, layout, model.num_parameters(), max_shard_size="100KB")
    for name in reversed(list(state)):  # any order
        writer.write(name, state[name])
    writer.close()
    index = json.loads((out / INDEX_NAME).read_text())
    assert index == json.loads((tmp_path / "reference" / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(
        p.name for p in (tmp_path / "reference").glob("*.safetensors")
    )
    got = tensors(out)
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    reader = StreamReader(tmp_path / "reference")
    assert all(torch.equal(reader.read(k), state[k]) for k in state)


def test_a_tensor_never_written_fails_the_close(tmp_path):
    writer = StreamWriter(tmp_path, {"a": (torch.float32, (2,)), "b": (torch.float32, (3,))}, 5)
    writer.write("a", torch.ones(2))
    with pytest.raises(ValueError, match="planned"):
        writer.write("b", torch.ones(4))
    with pytest.raises(RuntimeError, match="never written"):
        writer.close()


def lora_model(model_dir: Path, targets: list[str]):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    net = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return net


@pytest.mark.parametrize(
    "tied,dtype,targets",
    [
        (False, torch.float32, ["q_proj", "v_proj", "down_proj", "lm_head"]),
        (True, torch.bfloat16, ["q_proj", "o_proj", "gate_proj"]),
        (False, torch.float32, ["q_proj", "embed_tokens"]),  # an embedding LoRA: merged through peft
    ],
)
def test_merged_model_equals_peft_merge_and_unload(tmp_path, tied, dtype, targets, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = make_model(tmp_path / "base", tied, dtype)
    net = lora_model(model_dir, targets)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    out = tmp_path / "out"
    adapter = export.save_adapter(net, state, out / "adapter")

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(out / "adapter")).merge_and_unload()
    merged.config.use_cache = True
    reference = tmp_path / "reference"
    merged.to(dtype).save_pretrained(str(reference))
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(str(reference))

    streamed = export.lora_deltas(net, adapter) is not None
    assert streamed == ("embed_tokens" not in targets)
    if streamed:
        monkeypatch.setattr(export, "_save_merged_whole", None)  # must not be reached
    export.save_merged(net, adapter, str(model_dir), out / "model")
    same_folder(out / "model", reference)
