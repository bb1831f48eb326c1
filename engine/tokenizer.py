"""Tokenizer loading, chat-template rendering, prompt encoding and EOS ids.

Everything is local: a tokenizer comes from a folder (``tokenizer.json`` and its config),
never from a hub. Bad inputs raise ``ValueError`` with a message fit for an HTTP 400.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Sequence

CHAT_ROLES = ("system", "user", "assistant", "tool")


def load_tokenizer(path: str):
    """Loads the fast (Rust) tokenizer of a local HF folder. Raises ValueError if there is none."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise ValueError(f"tokenizer folder {path!r} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True, local_files_only=True,
                                                  trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot load a tokenizer from {path!r} (expected tokenizer.json or "
                         f"tokenizer.model with tokenizer_config.json): {e}") from e
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"the tokenizer in {path!r} is not a fast tokenizer (no tokenizer.json)")
    return tokenizer


def _message_text(index: int, message: Mapping[str, Any]) -> str:
    """The message content as one string; a list of text parts is joined with newlines."""
    content = message.get("content")
    if content is None and message.get("role") == "assistant" and message.get("tool_calls"):
        return ""  # an assistant turn that only calls tools
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"messages[{index}].content: only text parts "
                                 f"({{'type': 'text', 'text': str}}) are supported, got {part!r}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError(f"messages[{index}].content must be a string or a list of text parts, "
                     f"got {type(content).__name__}")


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Checks chat messages and returns copies whose ``content`` is a plain string."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} objects")
    normalized = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', "
                             f"got {type(message).__name__}")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role must be one of {list(CHAT_ROLES)}, got {role!r}")
        if "content" not in message and not message.get("tool_calls"):
            raise ValueError(f"messages[{i}] has no 'content'")
        normalized.append({**message, "content": _message_text(i, message)})
    return normalized


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Renders a conversation with the tokenizer's chat template (text, special tokens included).

    Encode the result with ``encode_prompt`` (or ``add_special_tokens=False``): the template
    already starts with the BOS token.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use a completion prompt instead")
    normalized = validate_messages(messages)
    try:
        rendered = tokenizer.apply_chat_template(normalized, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2 errors, including raise_exception() inside the template
        raise ValueError(f"cannot render the chat template: {e}") from e
    if not isinstance(rendered, str):
        raise ValueError(f"the chat template rendered {type(rendered).__name__}, expected a string")
    return rendered


def encode_prompt(tokenizer, text: str, add_special_tokens: Optional[bool] = None) -> list[int]:
    """Token ids of a prompt. By default special tokens (BOS) are added as the tokenizer does,
    except when the text already starts with the BOS token (a rendered chat template)."""
    if add_special_tokens is None:
        bos = getattr(tokenizer, "bos_token", None)
        add_special_tokens = not (bos and text.startswith(bos))
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _as_id_set(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value if v is not None}


def eos_token_ids(tokenizer, hf_config: Any = None) -> frozenset[int]:
    """Union of the tokenizer's EOS id and the model config's ``eos_token_id`` (an int or a list).

    hf_config: the config.json dict, a config object, or directly an id / list of ids.
    """
    ids = _as_id_set(getattr(tokenizer, "eos_token_id", None))
    if isinstance(hf_config, Mapping):
        ids |= _as_id_set(hf_config.get("eos_token_id"))
    elif isinstance(hf_config, (int, list, tuple, set, frozenset)):
        ids |= _as_id_set(hf_config)
    elif hf_config is not None:
        ids |= _as_id_set(getattr(hf_config, "eos_token_id", None))
    return frozenset(ids)


def rust_tokenizer(tokenizer):
    """The ``tokenizers.Tokenizer`` whose ``decode`` alone is what ``tokenizer.decode`` returns
    for a list of ids (see ``fast_decoder``), or None."""
    backend = getattr(tokenizer, "_tokenizer", None)
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    cls = type(tokenizer)
    if (backend is None or not isinstance(tokenizer, TokenizersBackend)
            or cls.decode is not PreTrainedTokenizerBase.decode or cls._decode is not TokenizersBackend._decode):
        return None  # its decode may do more than the Rust call: keep it
    # transformers skips the clean-up for BPE models unless forced (Llama 3 asks for it)
    forced = getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    if (getattr(tokenizer, "clean_up_tokenization_spaces", False)
            and (type(backend.model).__name__ != "BPE" or forced)):
        return None
    return backend


def fast_decoder(tokenizer) -> Callable[[Sequence[int], bool], str]:
    """``decode(ids, skip_special_tokens)`` with what ``tokenizer.decode`` returns for a list of ids.

    For a transformers fast tokenizer whose decoding is the library's own (no subclass changes
    it) and that does no tokenization-space clean-up, that is the Rust tokenizer's ``decode``
    alone: 0.9 µs for a 6-token window against 2.9 µs through transformers' Python, on the
    2-core CPU box. The detokenizer decodes twice a request a streamed step; at 128 requests
    output processing went from 1.87 to about 1.47 ms a step there (bench/host_step.py). Any
    other tokenizer keeps ``tokenizer.decode``."""
    def slow(ids: Sequence[int], skip_special_tokens: bool) -> str:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    backend = rust_tokenizer(tokenizer)
    if backend is None:
        return slow

    def fast(ids: Sequence[int], skip_special_tokens: bool) -> str:
        return backend.decode(ids, skip_special_tokens=skip_special_tokens)  # any int sequence
    return fast
