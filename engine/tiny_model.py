"""The built-in default model "kvmesh-tiny": created locally on first use, never downloaded.

It is a small Llama-architecture checkpoint in HF format with SEEDED RANDOM WEIGHTS and a
small byte-level BPE tokenizer trained here on a built-in English text. Its output is
gibberish: it exists so the engine, server and tests run anywhere with no model download.

Layout of the folder (``$KVMESH_CACHE_DIR`` or ``~/.cache/kvmesh``, then ``kvmesh-tiny-v1``)::

    config.json  generation_config.json  model.safetensors     LlamaForCausalLM, fp32
    tokenizer.json  tokenizer_config.json  (chat template)      PreTrainedTokenizerFast
    kvmesh_tiny.json                                            written last: the folder is complete

Creation is deterministic (same tokenizer and weights on every machine with the same library
versions) and atomic: the folder is built under a temporary name beside the target and renamed
into place, so a reader never sees a half-written model and two racing processes are both fine.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

TINY_MODEL_NAME = "kvmesh-tiny"
TINY_MODEL_VERSION = "kvmesh-tiny-v1"  # bump when the recipe changes: old folders are left alone
_MARKER = "kvmesh_tiny.json"
_SEED = 0
_VOCAB_SIZE = 1024  # including the special tokens

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
END_OF_TURN = "<|eot_id|>"
SPECIAL_TOKENS = [BEGIN_OF_TEXT, END_OF_TEXT, START_HEADER, END_HEADER, END_OF_TURN,
                  "<|reserved_special_token_0|>", "<|reserved_special_token_1|>"]

# Llama-3-style chat template. Content may be a string or a list of {"type": "text"} parts.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{- raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | map(attribute='text') | join('\\n') %}{%- endif %}"
    "{{- '" + START_HEADER + "' + message['role'] + '" + END_HEADER + "\\n\\n' + text | trim + '"
    + END_OF_TURN + "' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '" + START_HEADER + "assistant" + END_HEADER + "\\n\\n' }}{%- endif %}"
)

# Plain English the tokenizer is trained on (written for this module).
_BASE_TEXT = """\
The quick brown fox jumps over the lazy dog. A small engine serves many requests at once.
Each request brings a prompt, and the engine answers with new text, one token at a time.
The scheduler decides which requests run in the next step. It keeps a budget of tokens and
a budget of sequences, and it never lets the cache run out of blocks without a plan.
When memory is short, the newest request is paused, its blocks are freed, and later it is
computed again from the start. Nothing is lost: the same seed gives the same words.
The cache is split into blocks of sixteen tokens. A block that is full gets a hash, and a new
prompt that begins with the same tokens can reuse the block instead of computing it again.
This is called prefix caching, and it saves a great deal of work for chat, where every turn
repeats the whole conversation before it.
Good morning! How are you today? I am fine, thank you. What would you like to know?
Tell me about the weather. It is sunny in the morning and cloudy in the afternoon, with a
light wind from the west. Tomorrow there may be rain, so bring an umbrella.
The capital of France is Paris. The capital of Japan is Tokyo. The capital of Italy is Rome.
Water boils at one hundred degrees Celsius at sea level, and it freezes at zero degrees.
One, two, three, four, five, six, seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9 10 100 1000.
Once upon a time there was a little house at the edge of a forest. In the house lived an old
woman who kept bees, grew apples, and told stories to anyone who stopped at her door.
Every evening the children of the village came to listen, and every evening the story was new.
The river ran past the mill, the mill turned the stone, and the stone ground the wheat.
def add(a, b):
    return a + b
for i in range(10):
    print(i, add(i, i))
{"name": "kvmesh", "version": 1, "tags": ["engine", "cache", "router"]}
Question: What is two plus two? Answer: Two plus two is four.
Question: Which planet is the largest? Answer: Jupiter is the largest planet.
Question: Who wrote the play? Answer: The play was written by a writer from the north.
Please summarize the following paragraph in one sentence, and keep the important names.
Thank you for your help. You are welcome. Have a nice day, and see you soon.
"""

_SUBJECTS = ["the model", "a student", "the router", "my friend", "the old teacher", "a small cat",
             "the server", "our team", "the city", "a young doctor", "the scientist", "every user"]
_VERBS = ["reads", "writes", "finds", "builds", "watches", "remembers", "explains", "carries",
          "follows", "answers", "measures", "changes", "opens", "closes", "learns", "sends"]
_OBJECTS = ["a long letter", "the first question", "the red book", "a simple answer", "the map",
            "the last train", "a quiet song", "the next block", "a warm meal", "the open window",
            "the careful plan", "a bright light", "the green field", "some fresh bread"]
_ENDINGS = ["in the morning", "before dinner", "after the rain", "with great care", "very quickly",
            "for the second time", "without a word", "near the river", "at the station", "every day"]


def training_text() -> str:
    """The built-in text plus sentences generated from fixed word lists (deterministic)."""
    sentences = []
    for i in range(360):  # simple index arithmetic instead of a RNG: same text everywhere
        s = _SUBJECTS[i % len(_SUBJECTS)]
        v = _VERBS[(i * 7 + 3) % len(_VERBS)]
        o = _OBJECTS[(i * 5 + 1) % len(_OBJECTS)]
        e = _ENDINGS[(i * 3 + i // 10) % len(_ENDINGS)]
        sentences.append(f"{s[0].upper()}{s[1:]} {v} {o} {e}.")
    lines = [" ".join(sentences[i:i + 6]) for i in range(0, len(sentences), 6)]
    return _BASE_TEXT + "\n".join(lines) + "\n"


def default_cache_root() -> Path:
    return Path(os.environ.get("KVMESH_CACHE_DIR") or Path.home() / ".cache" / "kvmesh")


def resolve_model_path(model: str) -> str:
    """"kvmesh-tiny" -> the built-in model's folder (created if needed); anything else unchanged."""
    return ensure_tiny_model() if model == TINY_MODEL_NAME else model


def ensure_tiny_model(cache_dir: Optional[str] = None) -> str:
    """Returns the folder of the built-in model, creating it once (atomically) if absent.

    cache_dir: the root folder; defaults to ``$KVMESH_CACHE_DIR`` or ``~/.cache/kvmesh``.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    target = root / TINY_MODEL_VERSION
    if (target / _MARKER).is_file():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_MODEL_VERSION}.tmp-", dir=root))
    try:
        _build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model is not a secret
        try:
            os.rename(tmp, target)  # atomic on POSIX; fails if another process renamed first
        except OSError:
            if not (target / _MARKER).is_file():
                # A stale incomplete folder (not ours): replace it.
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _build(folder: Path) -> None:
    tokenizer = _build_tokenizer()
    tokenizer.save_pretrained(folder)
    _build_model(len(tokenizer), tokenizer.convert_tokens_to_ids(BEGIN_OF_TEXT),
                 [tokenizer.convert_tokens_to_ids(END_OF_TEXT), tokenizer.convert_tokens_to_ids(END_OF_TURN)],
                 folder)
    (folder / _MARKER).write_text(json.dumps({"name": TINY_MODEL_NAME, "version": TINY_MODEL_VERSION,
                                              "weights": "random (seeded)", "seed": _SEED}) + "\n")


def _build_tokenizer():
    """Byte-level BPE trained on ``training_text()``, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=_VOCAB_SIZE, min_frequency=1, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_text().splitlines(keepends=True), trainer=trainer)
    bos_id = tok.token_to_id(BEGIN_OF_TEXT)
    # Like Llama 3: encode() prepends <|begin_of_text|> unless add_special_tokens=False.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BEGIN_OF_TEXT} $A", pair=f"{BEGIN_OF_TEXT} $A {BEGIN_OF_TEXT} $B",
        special_tokens=[(BEGIN_OF_TEXT, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BEGIN_OF_TEXT, eos_token=END_OF_TEXT,
                                   chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
                                   model_max_length=4096)


def _build_model(vocab_size: int, bos_token_id: int, eos_token_ids: list[int], folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in Llama 3
        intermediate_size=768,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_ids,
    )
    with torch.random.fork_rng(devices=[]):  # seed the weights without touching the caller's RNG
        torch.manual_seed(_SEED)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(folder)
    # Readers written for the transformers 4 layout look for these top-level keys.
    config_path = folder / "config.json"
    data = json.loads(config_path.read_text())
    data.setdefault("rope_theta", 10000.0)
    data.setdefault("torch_dtype", "float32")
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
