"""The built-in kvmesh-tiny model: created once, atomically, loadable by HF transformers."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from engine import tiny_model
from engine.tiny_model import TINY_MODEL_VERSION, ensure_tiny_model, resolve_model_path


def _digest(folder: str) -> dict[str, str]:
    return {name: hashlib.sha256((Path(folder) / name).read_bytes()).hexdigest()
            for name in sorted(os.listdir(folder))}


def test_created_once_and_reused(tmp_path, monkeypatch):
    path = ensure_tiny_model(str(tmp_path))
    assert path == str(tmp_path / TINY_MODEL_VERSION)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(path))
    assert [p.name for p in tmp_path.iterdir()] == [TINY_MODEL_VERSION]  # no temp folder left
    before = _digest(path)

    def no_rebuild(folder):
        raise AssertionError("the model was built a second time")

    monkeypatch.setattr(tiny_model, "_build", no_rebuild)
    assert ensure_tiny_model(str(tmp_path)) == path
    assert _digest(path) == before


def test_loads_with_transformers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_tiny_model(str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert 1024 - 64 <= len(tokenizer) <= 2048
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.num_hidden_layers == 4 and model.config.num_key_value_heads == 2
    assert model.config.tie_word_embeddings is False and model.dtype == torch.float32
    assert tokenizer.chat_template and tokenizer.bos_token == "<|begin_of_text|>"
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()
    text = "Hello world, 你好 🙂"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_deterministic_across_builds(tmp_path):
    a = ensure_tiny_model(str(tmp_path / "a"))
    b = ensure_tiny_model(str(tmp_path / "b"))
    assert _digest(a) == _digest(b)


def test_racing_creators_agree(tmp_path):
    paths, errors = [], []

    def create():
        try:
            paths.append(ensure_tiny_model(str(tmp_path)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=create) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [TINY_MODEL_VERSION]
    assert (Path(paths[0]) / "kvmesh_tiny.json").is_file()


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMESH_CACHE_DIR", str(tmp_path))
    assert resolve_model_path("kvmesh-tiny") == str(tmp_path / TINY_MODEL_VERSION)
    assert resolve_model_path("/some/local/model") == "/some/local/model"


def test_stale_incomplete_folder_is_replaced(tmp_path):
    stale = tmp_path / TINY_MODEL_VERSION
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    path = ensure_tiny_model(str(tmp_path))
    assert (Path(path) / "model.safetensors").is_file()


def test_does_not_disturb_global_rng(tmp_path):
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ensure_tiny_model(str(tmp_path))
    assert torch.equal(torch.rand(3), expected)
