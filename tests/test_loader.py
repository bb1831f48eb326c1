"""ModelSpec parsing and weight loading: clear errors on bad inputs, dummy weights, TP shapes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from engine.config import LoadFormat
from engine.models import loader as loader_module
from engine.models.layers import ColumnParallelLinear, QKVParallelLinear, VocabParallelEmbedding
from engine.models.loader import load_model
from engine.models.spec import Architecture, ModelSpec, RopeType
from tests.hf_checkpoints import make_tiny_checkpoint, tiny_hf_config

CPU = torch.device("cpu")


def hf_dict(arch: str, **overrides) -> dict:
    """A config.json dict as transformers 5 writes it."""
    cfg = tiny_hf_config(arch, **overrides)
    d = cfg.to_dict()
    d["architectures"] = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    return d


def write_config(folder, cfg: dict) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(folder)


def load(path: str, load_format=LoadFormat.AUTO, seed: int = 0, **kw) -> torch.nn.Module:
    return load_model(path, ModelSpec.from_hf_config(path), torch.float32, CPU, load_format, seed, **kw)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory) -> str:
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama"))


# ---- ModelSpec ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,expected", [
    ("llama", Architecture.LLAMA), ("mistral", Architecture.MISTRAL), ("qwen2", Architecture.QWEN2),
    ("qwen3", Architecture.QWEN3), ("mixtral", Architecture.MIXTRAL),
    ("qwen2_moe", Architecture.QWEN2_MOE), ("qwen3_moe", Architecture.QWEN3_MOE)])
def test_spec_fields_per_architecture(arch, expected):
    spec = ModelSpec.from_hf_config(hf_dict(arch))
    assert spec.architecture == expected
    assert (spec.vocab_size, spec.hidden_size, spec.num_layers) == (512, 64, 2)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (4, 2, 16)
    assert spec.qkv_bias == (arch in ("qwen2", "qwen2_moe"))
    assert spec.qk_norm == (arch in ("qwen3", "qwen3_moe"))
    assert spec.is_moe == expected.is_moe
    assert spec.eos_token_ids == (2,) and spec.bos_token_id == 1
    assert spec.rope_scaling is None


def test_spec_moe_details():
    mixtral = ModelSpec.from_hf_config(hf_dict("mixtral")).moe
    assert (mixtral.num_experts, mixtral.top_k, mixtral.moe_intermediate_size) == (4, 2, 128)
    assert mixtral.norm_topk_prob  # Mixtral always renormalises
    qwen2 = ModelSpec.from_hf_config(hf_dict("qwen2_moe")).moe
    assert qwen2.shared_expert_intermediate_size == 48 and not qwen2.norm_topk_prob
    assert [qwen2.is_moe_layer(i) for i in range(2)] == [True, False]  # mlp_only_layers=[1]
    sparse_step = ModelSpec.from_hf_config(hf_dict("qwen2_moe", decoder_sparse_step=2,
                                                   mlp_only_layers=[])).moe
    assert [sparse_step.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    # Hub Qwen3-MoE configs say num_experts; transformers 5 writes num_local_experts.
    cfg = hf_dict("qwen3_moe")
    cfg["num_experts"] = cfg.pop("num_local_experts")
    assert ModelSpec.from_hf_config(cfg).moe.num_experts == 4


def test_spec_reads_transformers4_and_5_rope_fields():
    new = hf_dict("llama", llama3_rope=True)
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    old["rope_theta"] = 500000.0
    old["rope_scaling"] = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    a, b = ModelSpec.from_hf_config(new), ModelSpec.from_hf_config(old)
    assert a == b
    assert a.rope_theta == 500000.0 and a.rope_scaling.rope_type == RopeType.LLAMA3
    plain = {k: v for k, v in hf_dict("llama").items() if k != "rope_parameters"}
    assert ModelSpec.from_hf_config(plain | {"rope_theta": 1234.0}).rope_theta == 1234.0


def test_spec_from_folder_and_config_file(llama_path):
    from_folder = ModelSpec.from_hf_config(llama_path)
    assert from_folder == ModelSpec.from_hf_config(os.path.join(llama_path, "config.json"))
    assert from_folder.torch_dtype == "float32"


def test_missing_folder_names_the_path(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match="no-such-model.*does not exist"):
        ModelSpec.from_hf_config(missing)
    spec = ModelSpec.from_hf_config(hf_dict("llama"))
    with pytest.raises(ValueError, match="no-such-model"):
        load_model(missing, spec, torch.float32, CPU, LoadFormat.AUTO, 0)


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        ModelSpec.from_hf_config(tmp_path)


def test_malformed_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="malformed"):
        ModelSpec.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        ModelSpec.from_hf_config(tmp_path)


@pytest.mark.parametrize("field", ["hidden_size", "num_attention_heads", "vocab_size", "num_hidden_layers"])
def test_missing_required_field(field):
    cfg = hf_dict("llama")
    del cfg[field]
    with pytest.raises(ValueError, match=field):
        ModelSpec.from_hf_config(cfg)


def test_unsupported_architecture_lists_supported():
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64}
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported:.*LlamaForCausalLM.*Qwen3MoeForCausalLM"):
        ModelSpec.from_hf_config(cfg)
    with pytest.raises(ValueError, match="unsupported architecture: none"):
        ModelSpec.from_hf_config({"model_type": "llama"})


def test_heads_not_dividing():
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"):
        ModelSpec.from_hf_config(hf_dict("llama") | {"num_key_value_heads": 3})
    cfg = hf_dict("llama") | {"hidden_size": 66}
    del cfg["head_dim"]
    with pytest.raises(ValueError, match=r"hidden_size \(66\) must be divisible by num_attention_heads \(4\)"):
        ModelSpec.from_hf_config(cfg)


def test_unknown_rope_type_and_activation():
    cfg = hf_dict("llama")
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    with pytest.raises(ValueError, match="unsupported rope_type 'yarn'; supported: default, llama3"):
        ModelSpec.from_hf_config(cfg)
    cfg = hf_dict("llama", llama3_rope=True)
    del cfg["rope_parameters"]["low_freq_factor"]
    with pytest.raises(ValueError, match="low_freq_factor"):
        ModelSpec.from_hf_config(cfg)
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        ModelSpec.from_hf_config(hf_dict("llama", hidden_act="gelu"))


# ---- weight files ---------------------------------------------------------------------------

def test_no_safetensors_files(tmp_path):
    path = write_config(tmp_path, hf_dict("llama"))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no \*.safetensors weight files.*pytorch_model.bin"):
        load(path)


def test_index_listing_missing_shard(tmp_path):
    path = write_config(tmp_path, hf_dict("llama"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match="do not exist.*model-00001-of-00002"):
        load(path)


def _rewrite_weights(src: str, dst, edit) -> str:
    from safetensors.torch import load_file
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    write_config(dst, json.load(open(os.path.join(src, "config.json"))))
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return str(dst)


def test_missing_weight_is_named(llama_path, tmp_path):
    path = _rewrite_weights(llama_path, tmp_path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing weights for model.layers.1.self_attn.qkv_proj.weight \(shards \['k'\]\)"):
        load(path)
    path = _rewrite_weights(llama_path, tmp_path / "b", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="missing weights for lm_head.weight"):
        load(path)


def test_unexpected_weight_is_named(llama_path, tmp_path):
    def add(t):
        t["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)  # skipped, not an error
    path = _rewrite_weights(llama_path, tmp_path, add)
    with pytest.raises(ValueError, match="'model.layers.0.mlp.extra_proj.weight' does not match"):
        load(path)


def test_wrong_shape_is_named(llama_path, tmp_path):
    def shrink(t):
        t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"][:, :64].contiguous()
    path = _rewrite_weights(llama_path, tmp_path, shrink)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj.weight'.*shape \(64, 64\), expected 128 along dim 1"):
        load(path)


# ---- dummy weights --------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2_moe"])
def test_dummy_load_reads_no_files(tmp_path, monkeypatch, arch):
    path = write_config(tmp_path, hf_dict(arch))  # config only: no weight files at all

    def fail(*args, **kwargs):
        raise AssertionError("dummy load must not read weight files")
    monkeypatch.setattr(loader_module, "safe_open", fail)
    model = load(path, LoadFormat.DUMMY, seed=3)
    params = dict(model.named_parameters())
    assert params["model.embed_tokens.weight"].shape == (512, 64)
    assert params["model.layers.0.self_attn.qkv_proj.weight"].shape == ((4 + 2 * 2) * 16, 64)
    assert params["model.layers.1.input_layernorm.weight"].eq(1).all()
    assert (model.num_layers, model.num_kv_heads, model.head_dim) == (2, 2, 16)
    if arch == "qwen2_moe":
        assert params["model.layers.0.mlp.experts.w13"].shape == (4, 2 * 32, 64)
        assert params["model.layers.0.mlp.experts.w2"].shape == (4, 64, 32)
        assert params["model.layers.1.mlp.gate_up_proj.weight"].shape == (2 * 128, 64)  # dense layer
    embed = params["model.embed_tokens.weight"]
    assert 0.01 < embed.std() < 0.03
    again = dict(load(path, LoadFormat.DUMMY, seed=3).named_parameters())
    other = dict(load(path, LoadFormat.DUMMY, seed=4).named_parameters())
    assert torch.equal(again["model.embed_tokens.weight"], embed)
    assert not torch.equal(other["model.embed_tokens.weight"], embed)


def test_dummy_load_in_bfloat16(tmp_path):
    path = write_config(tmp_path, hf_dict("mixtral"))
    spec = ModelSpec.from_hf_config(path)
    model = load_model(path, spec, torch.bfloat16, CPU, LoadFormat.DUMMY, seed=0)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ---- tensor-parallel shapes -----------------------------------------------------------------

class NoComm:
    def all_reduce(self, t):
        raise AssertionError("not called in these shape tests")

    def all_gather(self, t, dim):
        raise AssertionError("not called in these shape tests")


def test_tp_shard_shapes(tmp_path):
    path = write_config(tmp_path, hf_dict("qwen3"))
    spec = ModelSpec.from_hf_config(path)
    model = load_model(path, spec, torch.float32, CPU, LoadFormat.DUMMY, 0,
                       tp_rank=3, tp_size=4, comm=NoComm())
    params = dict(model.named_parameters())
    assert model.num_kv_heads == 1  # 2 KV heads over 4 ranks: replicated
    assert params["model.layers.0.self_attn.qkv_proj.weight"].shape == ((1 + 2) * 16, 64)
    assert params["model.layers.0.self_attn.o_proj.weight"].shape == (64, 16)
    assert params["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * 32, 64)
    assert params["lm_head.weight"].shape == (128, 64)


def test_tp_layer_errors():
    with pytest.raises(ValueError, match="needs a communicator"):
        ColumnParallelLinear(8, 8, tp_rank=0, tp_size=2)
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) is not divisible by tensor_parallel_size \(8\)"):
        QKVParallelLinear(64, 16, num_heads=4, num_kv_heads=2, tp_size=8, comm=NoComm())
    with pytest.raises(ValueError, match="tp_rank must be in"):
        VocabParallelEmbedding(10, 4, tp_rank=2, tp_size=2, comm=NoComm())


def test_qkv_loader_replicates_kv_heads():
    # 4 query heads, 2 KV heads, tp 4: ranks 0,1 hold KV head 0; ranks 2,3 hold KV head 1.
    q = torch.arange(4.0).repeat_interleave(2)[:, None].expand(8, 3)  # head h rows = h
    k = torch.tensor([10.0, 10.0, 11.0, 11.0])[:, None].expand(4, 3)
    for rank, kv_head in [(0, 0), (1, 0), (2, 1), (3, 1)]:
        layer = QKVParallelLinear(3, 2, num_heads=4, num_kv_heads=2, tp_rank=rank, tp_size=4, comm=NoComm())
        layer.weight.data.zero_()
        layer.weight_loader(layer.weight, q, "q")
        layer.weight_loader(layer.weight, k, "k")
        assert layer.weight[:2, 0].tolist() == [rank, rank]
        assert layer.weight[2:4, 0].tolist() == [10.0 + kv_head] * 2
