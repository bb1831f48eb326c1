"""Tokenizer helpers and the incremental detokenizer, on tokenizers built locally.

Three tokenizer flavours: byte-level BPE (the kvmesh-tiny tokenizer, "Ġ" word starts), a
Llama-2-like SentencePiece BPE (normalizer prepends "▁", decoder strips one leading space,
byte fallback), and a Metaspace pre-tokenizer one with byte fallback.
"""

from __future__ import annotations

import json
import random

import pytest

from engine.detokenizer import IncrementalDetokenizer, decode_token
from engine.tiny_model import END_OF_TEXT, END_OF_TURN, ensure_tiny_model, training_text
from engine.tokenizer import apply_chat_template, encode_prompt, eos_token_ids, fast_decoder, load_tokenizer

TEXTS = [
    "Hello world, the capital of France is Paris.",
    "I like 🙂 and 🚀 a lot!",
    "你好，世界。Chinese text: 漢字 and kana かな.",
    "Café déjà vu — naïve façade.",
    "Lines\nwith  double  spaces\n\tand tabs.",
    "👩‍👩‍👧 family 🇫🇷 flag",
]


def _sentencepiece_like(flavor: str):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    if flavor == "llama2":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.ByteFallback(),
                                         decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(training_text().splitlines(), trainer=trainer)
    # The byte tokens must be ordinary vocabulary, not added special tokens.
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if not t["content"].startswith("<0x")]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return ensure_tiny_model(str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def tiny_tok(tiny_path):
    return load_tokenizer(tiny_path)


@pytest.fixture(scope="module")
def tokenizers(tiny_tok):
    return {"byte_level": tiny_tok, "llama2": _sentencepiece_like("llama2"),
            "metaspace": _sentencepiece_like("metaspace")}


def stream(detok, ids, chunk=1):
    deltas = []
    for i in range(0, len(ids), chunk):
        update = detok.update(ids[i:i + chunk])
        deltas.append(update.delta_text)
        if update.stop_str is not None:
            return deltas, update.stop_str
    deltas.append(detok.flush())
    return deltas, None


# ---- fast decode ----------------------------------------------------------------------------------
@pytest.mark.parametrize("flavor", ["byte_level", "llama2", "metaspace"])
@pytest.mark.parametrize("clean_up", [False, True])
def test_fast_decoder_is_tokenizer_decode(tokenizers, flavor, clean_up):
    """The Rust decode the detokenizer calls returns what ``tokenizer.decode`` does, for every
    window of every text (special tokens and split characters included), skipping specials or
    not; with the clean-up on, BPE tokenizers still take it (transformers skips the clean-up for
    BPE) and the text is the same."""
    tok = tokenizers[flavor]
    old = tok.clean_up_tokenization_spaces
    tok.clean_up_tokenization_spaces = clean_up
    try:
        decode = fast_decoder(tok)
        assert decode.__name__ == "fast"  # all three are BPE models
        for text in TEXTS:
            ids = [tok.bos_token_id or 0] + tok.encode(text + " ,x .", add_special_tokens=False) + [tok.eos_token_id or 0]
            for start in range(0, len(ids), 3):
                for end in (start + 1, start + 6, len(ids)):
                    for skip in (True, False):
                        assert decode(ids[start:end], skip) == tok.decode(ids[start:end], skip_special_tokens=skip)
    finally:
        tok.clean_up_tokenization_spaces = old


def test_fast_decoder_keeps_a_decode_a_subclass_changed(tiny_tok):
    import copy
    tok = copy.copy(tiny_tok)
    tok.__class__ = type("Shouting", (type(tiny_tok),), {"decode": lambda self, ids, **kw: "HI"})
    decode = fast_decoder(tok)
    assert decode([5, 6], True) == "HI"


# ---- incremental detokenizer ------------------------------------------------------------------
@pytest.mark.parametrize("flavor", ["byte_level", "llama2", "metaspace"])
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_deltas_join_to_full_decode(tokenizers, flavor, text, chunk):
    tok = tokenizers[flavor]
    ids = tok.encode(text, add_special_tokens=False)
    # Without prompt context the deltas are exactly decode(output ids).
    detok = IncrementalDetokenizer(tok, [])
    deltas, _ = stream(detok, ids, chunk)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    assert detok.output_text == "".join(deltas)
    assert all("\ufffd" not in d for d in deltas)  # no broken characters mid-stream


@pytest.mark.parametrize("flavor", ["byte_level", "llama2", "metaspace"])
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_continue_the_prompt(tokenizers, flavor, text):
    tok = tokenizers[flavor]
    prompt = tok.encode("Once upon a time,", add_special_tokens=True)
    ids = tok.encode(" " + text, add_special_tokens=False)
    deltas, _ = stream(IncrementalDetokenizer(tok, prompt), ids)
    prompt_text = tok.decode(prompt, skip_special_tokens=True)
    full = tok.decode(prompt + ids, skip_special_tokens=True)
    assert full.startswith(prompt_text)
    assert "".join(deltas) == full[len(prompt_text):]  # the leading space is kept
    if flavor == "byte_level":
        assert "".join(deltas) == tok.decode(ids)
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("flavor", ["byte_level", "llama2", "metaspace"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_stream_gives_the_windows_deltas_step_by_step(tokenizers, flavor, skip_special_tokens):
    """Without stop strings the detokenizer runs the Rust DecodeStream: each step's delta and
    the flush equal the two-decode window's (forced by taking the stream away), over every
    text, special tokens and an output cut mid-character included."""
    tok = tokenizers[flavor]
    prompt = tok.encode("Once upon a time,", add_special_tokens=True)
    for text in TEXTS:
        ids = tok.encode(" " + text, add_special_tokens=False) + [tok.eos_token_id]
        ids += tok.encode(" ok 🚀", add_special_tokens=False)[:-1]  # ends mid-character
        fast = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special_tokens)
        window = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special_tokens)
        assert fast._stream is not None, "the stream path was not taken"
        window._stream = None
        assert stream(fast, ids) == stream(window, ids), text


def test_decode_stream_matches_the_window_on_random_ids(tiny_tok):
    """Random ids (byte tokens that form no character, special tokens, prompts that end
    mid-character: then the window is used from the start), with and without stop strings
    (pieces of the decoded text, so they hit): the same deltas, stop and flush."""
    rng = random.Random(0)
    vocab = len(tiny_tok)
    hits = 0
    for _ in range(150):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 12))]
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        text = tiny_tok.decode(ids)
        start = rng.randrange(len(text)) if text else 0
        stops = [(), (text[start:start + rng.randrange(1, 5)], "\n\n")]
        for skip in (True, False):
            for stop in stops:
                for include in (False, True):
                    args = dict(skip_special_tokens=skip, stop=stop, include_stop_str_in_output=include)
                    fast = IncrementalDetokenizer(tiny_tok, prompt, **args)
                    window = IncrementalDetokenizer(tiny_tok, prompt, **args)
                    assert (fast._stream is not None) == (fast._prefix_offset == 0)  # used unless mid-char
                    window._stream = None
                    got = stream(fast, ids)
                    assert got == stream(window, ids), (prompt, ids, args)
                    hits += got[1] is not None
    assert hits > 100  # the stop strings were found, not only missed


def test_multibyte_character_comes_out_whole(tokenizers):
    tok = tokenizers["llama2"]
    ids = tok.encode("ok 🚀", add_special_tokens=False)
    assert len([t for t in tok.convert_ids_to_tokens(ids) if t.startswith("<0x")]) == 4
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.update([i]).delta_text for i in ids]
    assert "🚀" in deltas and "".join(deltas) == "ok 🚀"


def test_incomplete_character_released_by_flush(tokenizers):
    tok = tokenizers["llama2"]
    ids = tok.encode("a 🚀", add_special_tokens=False)[:-1]  # last byte of the emoji missing
    detok = IncrementalDetokenizer(tok, [])
    text = "".join(detok.update([i]).delta_text for i in ids)
    assert text == "a "
    assert text + detok.flush() == tok.decode(ids)  # U+FFFD, like a full decode


def test_special_tokens_skipped_or_kept(tiny_tok):
    ids = tiny_tok.encode("Hi there", add_special_tokens=False) + [tiny_tok.convert_tokens_to_ids(END_OF_TURN)]
    skipped, _ = stream(IncrementalDetokenizer(tiny_tok, [1], skip_special_tokens=True), ids)
    kept, _ = stream(IncrementalDetokenizer(tiny_tok, [1], skip_special_tokens=False), ids)
    assert "".join(skipped) == "Hi there"
    assert "".join(kept) == "Hi there" + END_OF_TURN


# ---- stop strings -----------------------------------------------------------------------------
@pytest.mark.parametrize("flavor", ["byte_level", "llama2"])
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(tokenizers, flavor, include):
    tok = tokenizers[flavor]
    text = "Hello world, the capital of France is Paris."
    ids = tok.encode(text, add_special_tokens=False)
    stop = "pital of Fr"
    assert not any(stop in tok.decode([i]) for i in ids)  # it spans several tokens
    detok = IncrementalDetokenizer(tok, [], stop=[stop, "zzz"], include_stop_str_in_output=include)
    deltas, stop_str = stream(detok, ids)
    expected = text[:text.index(stop) + (len(stop) if include else 0)]
    assert stop_str == stop
    assert "".join(deltas) == expected == detok.output_text
    # While streaming, every emitted prefix is a prefix of the final text.
    emitted = ""
    for d in deltas:
        emitted += d
        assert expected.startswith(emitted)
    assert detok.update(ids[:1]).delta_text == "" and detok.flush() == ""


def test_partial_stop_string_is_held_back(tiny_tok):
    ids = tiny_tok.encode("the cat sat on the ca", add_special_tokens=False)
    detok = IncrementalDetokenizer(tiny_tok, [], stop=["cab"])
    emitted = "".join(detok.update([i]).delta_text for i in ids)
    assert emitted == "the cat sat on the "  # "ca" might still become "cab"
    assert detok.flush() == "ca" and detok.output_text == "the cat sat on the ca"


def test_earliest_stop_string_wins(tiny_tok):
    ids = tiny_tok.encode("one two three four", add_special_tokens=False)
    deltas, stop_str = stream(IncrementalDetokenizer(tiny_tok, [], stop=["four", "two"]), ids, chunk=len(ids))
    assert stop_str == "two" and "".join(deltas) == "one "


def test_stop_string_at_first_token(tiny_tok):
    ids = tiny_tok.encode("Paris is nice", add_special_tokens=False)
    deltas, stop_str = stream(IncrementalDetokenizer(tiny_tok, [5], stop=["P"]), ids)
    assert stop_str == "P" and "".join(deltas) == ""


def test_decode_token(tiny_tok):
    ids = tiny_tok.encode(" Paris", add_special_tokens=False)
    assert "".join(decode_token(tiny_tok, i) for i in ids) == " Paris"
    assert decode_token(tiny_tok, tiny_tok.convert_tokens_to_ids(END_OF_TEXT)) == END_OF_TEXT


# ---- tokenizer helpers ------------------------------------------------------------------------
def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="tokenizer"):
        load_tokenizer(str(tmp_path / "empty"))


def test_chat_template_renders_llama3_style(tiny_tok):
    rendered = apply_chat_template(tiny_tok, [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                                           {"type": "text", "text": "there"}]}])
    assert rendered == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                        "<|start_header_id|>user<|end_header_id|>\n\nHi\nthere<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    no_prompt = apply_chat_template(tiny_tok, [{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert no_prompt.endswith("Hi<|eot_id|>")
    ids = encode_prompt(tiny_tok, rendered)
    assert ids.count(tiny_tok.bos_token_id) == 1 and ids[0] == tiny_tok.bos_token_id
    assert ids[-2:] == tiny_tok.encode("<|end_header_id|>\n\n", add_special_tokens=False)[-2:]
    # The template also accepts list content directly (as HF's apply_chat_template passes it).
    direct = tiny_tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                          tokenize=False, add_generation_prompt=False)
    assert direct.endswith("Hi<|eot_id|>")


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty"),
    ("hello", "non-empty"),
    (["hello"], "object"),
    ([{"role": "wizard", "content": "x"}], "role"),
    ([{"content": "x"}], "role"),
    ([{"role": "user"}], "content"),
    ([{"role": "user", "content": 3}], "content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "text parts"),
])
def test_malformed_messages(tiny_tok, messages, match):
    with pytest.raises(ValueError, match=match):
        apply_chat_template(tiny_tok, messages)


def test_no_chat_template(tokenizers):
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template(tokenizers["llama2"], [{"role": "user", "content": "Hi"}])


def test_encode_prompt_adds_bos_once(tiny_tok):
    ids = encode_prompt(tiny_tok, "Hello world")
    assert ids[0] == tiny_tok.bos_token_id and ids.count(tiny_tok.bos_token_id) == 1
    assert ids[1:] == tiny_tok.encode("Hello world", add_special_tokens=False)
    assert encode_prompt(tiny_tok, "Hello", add_special_tokens=False) == tiny_tok.encode("Hello", add_special_tokens=False)


def test_eos_token_ids_union(tiny_tok, tiny_path):
    config = json.loads(open(f"{tiny_path}/config.json").read())
    end_of_text, eot = tiny_tok.convert_tokens_to_ids([END_OF_TEXT, END_OF_TURN])
    assert eos_token_ids(tiny_tok, config) == frozenset({end_of_text, eot})
    assert eos_token_ids(tiny_tok, {"eos_token_id": 7}) == frozenset({end_of_text, 7})
    assert eos_token_ids(tiny_tok, [eot, 9]) == frozenset({end_of_text, eot, 9})
    assert eos_token_ids(tiny_tok, None) == frozenset({end_of_text})
