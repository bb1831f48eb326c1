"""kvmesh models vs HF transformers on tiny random checkpoints (CPU, fp32).

For each architecture: a flattened, chunked prefill of prompts of mixed
lengths through the paged KV cache must give HF's logits, and greedy decoding
step by step must give HF ``generate(do_sample=False)`` token for token.
"""

from __future__ import annotations

import logging
from typing import Callable

import pytest
import torch
from transformers import GenerationConfig

from engine.attention.base import AttentionMetadata, ForwardContext, allocate_kv_cache
from engine.attention.torch_ref import TorchRefBackend
from engine.config import LoadFormat
from engine.models.loader import load_model
from engine.models.spec import ModelSpec
from tests.hf_checkpoints import ARCHITECTURES, load_hf_model, make_tiny_checkpoint
from tests.thread_ranks import run_ranks

BLOCK_SIZE = 4  # small, so every prompt spans several blocks
NUM_NEW_TOKENS = 12
ATOL = 1e-4
PROMPT_LENS = (5, 11, 1, 8)
# (prompt index, tokens in step 1): prompts 1 and 3 are prefilled in two chunks.
FIRST_CHUNK = {0: 5, 1: 6, 2: 1, 3: 3}


class PagedKV:
    """Test helper: a paged KV cache whose blocks are handed out in allocation order.

    ``step(model, chunks)`` runs one flattened forward over chunks
    [(seq_id, new token ids)], each continuing where that sequence left off.
    Sequences grow block by block, so their blocks interleave in the pool.
    """

    def __init__(self, model: torch.nn.Module, num_blocks: int = 128) -> None:
        weight = model.lm_head.weight
        self.device = weight.device
        self.kv_caches = allocate_kv_cache(model.num_layers, num_blocks, BLOCK_SIZE, model.num_kv_heads,
                                           model.head_dim, weight.dtype, self.device)
        self.block_tables: dict[int, list[int]] = {}
        self.seq_lens: dict[int, int] = {}
        self.num_blocks_used = 0
        self.backend = TorchRefBackend()

    def step(self, model: torch.nn.Module, chunks: list[tuple[int, list[int]]]) -> torch.Tensor:
        """Returns hidden states (T, H) of all new tokens, in chunk order."""
        ids, positions, slots, query_start, seq_lens = [], [], [], [0], []
        for seq_id, token_ids in chunks:
            start = self.seq_lens.get(seq_id, 0)
            end = start + len(token_ids)
            table = self.block_tables.setdefault(seq_id, [])
            while len(table) * BLOCK_SIZE < end:
                table.append(self.num_blocks_used)
                self.num_blocks_used += 1
            ids += token_ids
            positions += list(range(start, end))
            slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)]
            query_start.append(query_start[-1] + len(token_ids))
            seq_lens.append(end)
            self.seq_lens[seq_id] = end
        tables = [self.block_tables[seq_id] for seq_id, _ in chunks]
        width = max(len(t) for t in tables)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                                      device=dev),
            max_query_len=max(len(c) for _, c in chunks),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=query_start,
            seq_lens_cpu=seq_lens,
        )
        ctx = ForwardContext(attn_metadata=meta, kv_caches=self.kv_caches, backend=self.backend)
        with torch.inference_mode():
            return model(torch.tensor(ids, dtype=torch.long, device=dev),
                         torch.tensor(positions, device=dev), ctx)


def make_prompts(seed: int, lens=PROMPT_LENS) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in lens]


def chunked_prefill_logits(model, kv: PagedKV, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Prefill in two steps (some prompts split across them); logits (L_i, vocab) per prompt."""
    first = [(i, p[:FIRST_CHUNK.get(i, len(p))]) for i, p in enumerate(prompts)]
    rest = [(i, p[len(c):]) for (i, c), p in zip(first, prompts) if len(c) < len(p)]
    pieces: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(prompts))}
    for chunks in (first, rest):
        if not chunks:
            continue
        logits = model.compute_logits(kv.step(model, chunks))  # (T, vocab)
        for (i, c), part in zip(chunks, logits.split([len(c) for _, c in chunks])):
            pieces[i].append(part)
    return [torch.cat(pieces[i]) for i in range(len(prompts))]


def greedy_decode(model, prompts: list[list[int]], num_new: int = NUM_NEW_TOKENS) -> list[list[int]]:
    kv = PagedKV(model)
    logits = chunked_prefill_logits(model, kv, prompts)
    outputs = [[int(lg[-1].argmax())] for lg in logits]
    for _ in range(num_new - 1):  # every sequence decodes one token per step, in one batch
        hidden = kv.step(model, [(i, [out[-1]]) for i, out in enumerate(outputs)])
        for out, token in zip(outputs, model.compute_logits(hidden).argmax(-1).tolist()):
            out.append(token)
    return outputs


def hf_logits(hf, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([prompt], device=hf.device)).logits[0].float()  # (L, vocab)


def hf_greedy(hf, prompt: list[int], num_new: int = NUM_NEW_TOKENS) -> list[int]:
    # No eos: our loop never stops early. (HF fills unset fields from hf.generation_config.)
    hf.generation_config.eos_token_id = None
    config = GenerationConfig(max_new_tokens=num_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = hf.generate(torch.tensor([prompt], device=hf.device), generation_config=config)
    return out[0, len(prompt):].tolist()


def ours(path: str, dtype=torch.float32, device="cpu", load_format=LoadFormat.AUTO,
         **kw) -> torch.nn.Module:
    return load_model(path, ModelSpec.from_hf_config(path), dtype, torch.device(device),
                      load_format, seed=0, **kw)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Callable[..., str]:
    """checkpoint(arch, **options) -> path, built once per module per (arch, options)."""
    cache: dict[tuple, str] = {}

    def get(arch: str, **options) -> str:
        key = (arch, tuple(sorted(options.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(arch)
            cache[key] = make_tiny_checkpoint(arch, folder, seed=ARCHITECTURES.index(arch), **options)
        return cache[key]
    return get


def assert_matches_hf(path: str, model=None, prompt_lens=PROMPT_LENS, atol: float = ATOL) -> None:
    model = model or ours(path)
    hf = load_hf_model(path).to(model.lm_head.weight.device)
    prompts = make_prompts(seed=len(prompt_lens), lens=prompt_lens)
    for prompt, got in zip(prompts, chunked_prefill_logits(model, PagedKV(model), prompts)):
        torch.testing.assert_close(got, hf_logits(hf, prompt), atol=atol, rtol=0)
    for prompt, got in zip(prompts, greedy_decode(model, prompts)):
        assert got == hf_greedy(hf, prompt), f"greedy tokens differ for prompt of length {len(prompt)}"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefill_and_greedy_match_hf(checkpoint, arch):
    assert_matches_hf(checkpoint(arch))


def test_llama3_rope_scaling(checkpoint):
    path = checkpoint("llama", llama3_rope=True)
    assert ModelSpec.from_hf_config(path).rope_scaling is not None
    assert_matches_hf(path, prompt_lens=(70, 3))  # past original_max_position_embeddings 64


def test_llama3_inverse_frequencies_match_hf():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from engine.models.rotary import inverse_frequencies
    from tests.hf_checkpoints import tiny_hf_config
    config = tiny_hf_config("llama", llama3_rope=True)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    spec = ModelSpec.from_hf_config(config.to_dict() | {"architectures": ["LlamaForCausalLM"]})
    torch.testing.assert_close(inverse_frequencies(16, spec.rope_theta, spec.rope_scaling), expected)


def test_tied_embeddings(checkpoint):
    path = checkpoint("qwen2", tie_word_embeddings=True)
    model = ours(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_matches_hf(path, model)


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    params_b = dict(b.named_parameters())
    for name, param in a.named_parameters():
        assert torch.equal(param, params_b[name]), name


def test_sharded_checkpoint_loads_same_weights(checkpoint, caplog):
    path = checkpoint("qwen3", max_shard_size="40KB")  # same seed as the unsharded qwen3
    with caplog.at_level(logging.INFO, logger="engine.models.loader"):
        model = ours(path)
    assert any("loading shard 2/" in r.getMessage() for r in caplog.records)
    assert_same_params(model, ours(checkpoint("qwen3")))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_fused_expert_layout_loads_same_weights(checkpoint, arch):
    """transformers 5 can also save experts as 3-D gate_up_proj / down_proj tensors."""
    path = checkpoint(arch, fused_experts=True)  # same seed as the per-expert checkpoint
    from safetensors import safe_open
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    assert_same_params(ours(path), ours(checkpoint(arch)))


def test_bfloat16_load_runs(checkpoint):
    path = checkpoint("qwen3_moe")
    model = ours(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    kv = PagedKV(model)
    logits = model.compute_logits(kv.step(model, [(0, [5, 6, 7])]))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    expected = hf_logits(load_hf_model(path), [5, 6, 7])
    assert (logits - expected).abs().max() < 0.5  # bf16: loose


@pytest.mark.parametrize("arch,tp_size", [("llama", 2), ("qwen3", 4), ("qwen2_moe", 2)])
def test_tensor_parallel_shards_match_single_rank(checkpoint, arch, tp_size):
    """Ranks in threads with in-process collectives give the unsharded logits.

    qwen3 at tp 4 has 2 KV heads, so each KV head is replicated on 2 ranks.
    """
    path = checkpoint(arch)
    prompts = make_prompts(seed=7)
    single = ours(path)
    expected = chunked_prefill_logits(single, PagedKV(single), prompts)

    def run(rank: int, comm) -> list:
        model = ours(path, tp_rank=rank, tp_size=tp_size, comm=comm)
        assert model.num_kv_heads == max(1, 2 // tp_size)
        return chunked_prefill_logits(model, PagedKV(model), prompts)

    for rank_logits in run_ranks(tp_size, run):
        for got, want in zip(rank_logits, expected):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2_moe", "qwen3_moe"])
def test_cuda_matches_hf(checkpoint, arch):
    """Same checks on the GPU (fp32, TF32 off), plus bf16 real and dummy loads straight to the GPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    path = checkpoint(arch)
    assert_matches_hf(path, ours(path, device="cuda"), atol=1e-3)
    for load_format in (LoadFormat.AUTO, LoadFormat.DUMMY):
        model = ours(path, dtype=torch.bfloat16, device="cuda", load_format=load_format)
        assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.bfloat16, "cuda")}
        logits = model.compute_logits(PagedKV(model).step(model, [(0, [5, 6, 7]), (1, [9])]))
        assert logits.shape == (4, 512) and torch.isfinite(logits).all()
