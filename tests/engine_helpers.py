"""Helpers for engine tests: tiny checkpoints with a tokenizer, and the no-leak check."""

from __future__ import annotations

import contextlib
import os

from tests.hf_checkpoints import make_tiny_checkpoint


def checkpoint_with_tokenizer(arch: str, path: "str | os.PathLike[str]", **options) -> tuple[str, int]:
    """A tiny random ``arch`` checkpoint plus kvmesh-tiny's tokenizer, so LLM(model=path) works.

    Returns (path, vocab_size); the vocabulary is the tokenizer's.
    """
    from engine.tiny_model import ensure_tiny_model
    from engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ensure_tiny_model())
    vocab_size = len(tokenizer)
    path = make_tiny_checkpoint(arch, path, vocab_size=vocab_size, **options)
    tokenizer.save_pretrained(path)
    return path, vocab_size


def assert_no_leaks(llm_or_engine) -> None:
    """Every KV block is free (plain or cached-and-unreferenced) and no request is left."""
    engine = getattr(llm_or_engine, "engine", llm_or_engine)
    scheduler = engine.scheduler
    scheduler.check_invariants()
    assert not scheduler.has_unfinished_requests()
    pool = scheduler.kv_cache_manager.block_pool
    assert all(b.ref_cnt == 0 for b in pool.blocks), "referenced KV blocks left behind"
    assert pool.num_free_blocks == pool.num_blocks
    assert not engine.output_processor.prompts, "output state left behind"


@contextlib.asynccontextmanager
async def gloo_connector_pair(config):
    """Two in-process ``AsyncLLM``s of ``config`` joined as a prefill and a decode replica join
    them (connectors over gloo, an in-process mailbox); yields (prefill, decode) connectors and
    closes them on exit. The engines (``prefill.engine``, ``decode.engine``) keep running: the
    caller checks and shuts them down."""
    from engine import AsyncLLM
    from engine.kv_transfer.base import KVTransportKind, create_backend
    from engine.kv_transfer.connector import DecodeConnector, PrefillConnector
    from engine.kv_transfer.mailbox import LocalMailbox

    p_engine, d_engine = AsyncLLM.from_config(config), AsyncLLM.from_config(config)
    prefill = PrefillConnector(p_engine, create_backend(KVTransportKind.GLOO, "cpu"), "p0", timeout_s=10)
    decode = DecodeConnector(d_engine, create_backend(KVTransportKind.GLOO, "cpu"), LocalMailbox(), "d0",
                             timeout_s=10)
    decode.start()
    try:
        yield prefill, decode
    finally:
        decode.close()
        prefill.close()
