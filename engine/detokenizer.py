"""Incremental detokenization with stop strings.

Decoding token by token is wrong in two ways: a multi-byte character split over byte tokens
decodes to U+FFFD halves, and tokenizers that mark word starts (SentencePiece "▁", byte-level
"Ġ") decode a lone token differently from the same token inside text. So each step decodes a
short window of tokens twice and emits only the difference::

    tokens:  [ ...prompt tail... | out0 out1 out2 ... ]
                  ^prefix_offset      ^read_offset      ^len(tokens)
    prefix_text = decode(tokens[prefix_offset:read_offset])   (already emitted)
    new_text    = decode(tokens[prefix_offset:])
    delta       = new_text[len(prefix_text):]   unless new_text ends in U+FFFD (incomplete char:
                                                wait for more tokens; the offsets stay put)

The window starts inside the prompt, so the first output token decodes as a continuation:
a SentencePiece "▁Paris" after "is" yields " Paris" (as in vLLM), where decoding the output
alone would drop that leading space. For byte-level tokenizers both agree.

Where the tokenizer is a plain Rust one (``rust_tokenizer``), the window is the Rust library's
own ``DecodeStream``, started on the same prompt tail: the same algorithm (it keeps the same two
offsets, which are mirrored here so ``flush`` and a fallback continue from them), one Rust call a
token instead of two decodes and the Python around them.

Stop strings are searched in the decoded text, so one spanning several tokens is found. While
streaming, the last (longest stop string - 1) characters are held back so a partial stop
string never reaches the client; ``flush()`` releases them when the request ends otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from engine.tokenizer import fast_decoder, rust_tokenizer

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None

# Prompt tokens kept as decoding context: enough for a leading-space decision and for a
# multi-byte character (up to 4 byte tokens) at the end of the prompt.
_NUM_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class DetokenizerUpdate:
    delta_text: str  # new text for the client (may be empty)
    stop_str: Optional[str] = None  # the stop string found; the request should finish


_NO_UPDATE = DetokenizerUpdate("")


def decode_token(tokenizer, token_id: int) -> str:
    """The text of one token on its own (for logprobs); special tokens keep their text."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a request's output tokens into text deltas, one ``update`` per step.

    Invariant: ``output_text`` (everything emitted) is a prefix of the decoded output, minus at
    most the held-back tail, and never contains a stop string unless
    ``include_stop_str_in_output`` (then it ends with the first one found).
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True,
                 stop: Sequence[str] = (), include_stop_str_in_output: bool = False) -> None:
        self.tokenizer = tokenizer
        self._decoder = fast_decoder(tokenizer)
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        # Hold-back length: only needed when the stop string must not appear in the output.
        self._hold_len = 0 if include_stop_str_in_output or not self.stop else max(map(len, self.stop)) - 1
        context = list(prompt_token_ids[-_NUM_CONTEXT_TOKENS:])
        self._tokens: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        if context and self._decode(context).endswith(_REPLACEMENT_CHAR):
            # The prompt ends mid-character: its bytes belong to the first output character's text,
            # which we cannot split; start the window after the prompt instead.
            self._prefix_offset = self._read_offset
        # DecodeStream: a plain Rust tokenizer, the window starting at the prompt tail (not after
        # a prompt that ends mid-character, which it would not skip)
        self._rust = rust_tokenizer(tokenizer) if DecodeStream is not None else None
        self._stream = (DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
                        if self._rust is not None and self._prefix_offset == 0 else None)
        self._text = ""  # decoded output so far (complete characters only)
        self._num_emitted = 0  # characters of _text already returned
        self.stop_str: Optional[str] = None
        self._finished = False

    @property
    def output_text(self) -> str:
        return self._text[:self._num_emitted]

    @property
    def is_stopped(self) -> bool:
        return self.stop_str is not None

    def _decode(self, ids: Sequence[int]) -> str:
        return self._decoder(ids, self.skip_special_tokens)

    def _decode_pending(self, final: bool) -> str:
        """Text of tokens past read_offset; "" while the last character is incomplete (unless final)."""
        prefix_text = self._decode(self._tokens[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._tokens[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) and not final:
            return ""  # e.g. a skipped special token, or bytes that do not yet form a character
        if new_text.endswith(_REPLACEMENT_CHAR) and not final:
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        return new_text[len(prefix_text):]

    def update(self, new_token_ids: Sequence[int]) -> DetokenizerUpdate:
        """Appends sampled tokens; returns the text that may now be shown and any stop string hit."""
        if self._finished or not new_token_ids:
            return _NO_UPDATE
        if self._stream is not None:
            delta = self._stream_decode(new_token_ids)
        else:
            self._tokens.extend(new_token_ids)
            delta = self._decode_pending(final=False)
        if not self.stop:
            # Nothing to find or hold back: the step's text as decoded (``_advance``'s answer,
            # for less work; most requests)
            if not delta:
                return _NO_UPDATE
            self._text += delta
            self._num_emitted = len(self._text)
            return DetokenizerUpdate(delta)
        return self._advance(delta, final=False)

    def _stream_decode(self, new_token_ids: Sequence[int]) -> str:
        """``_decode_pending`` through the DecodeStream, token by token: a chunk for a token
        moves the offsets as ``_decode_pending`` would (the same rule); on an error (e.g. a
        decode that does not extend the text before it) the window takes over for good from
        the offsets."""
        delta = ""
        for index, token_id in enumerate(new_token_ids):
            self._tokens.append(token_id)
            try:
                chunk = self._stream.step(self._rust, token_id)
            except Exception:  # noqa: BLE001 - the window below decodes what is pending
                self._stream = None
                self._tokens.extend(new_token_ids[index + 1:])
                return delta + self._decode_pending(final=False)
            if chunk is not None:
                self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
                delta += chunk
        return delta

    def flush(self) -> str:
        """Releases held-back text (and an incomplete trailing character) when the request ends
        for another reason than a stop string. Later updates return nothing."""
        if self._finished:
            return ""
        delta = self._advance(self._decode_pending(final=True), final=True).delta_text
        self._finished = True
        return delta

    def _advance(self, decoded: str, final: bool) -> DetokenizerUpdate:
        """Appends newly decoded text, looks for a stop string in it, and emits what may be
        shown (all of it when final, else less the hold-back)."""
        old_len = len(self._text)
        self._text += decoded
        stop = self._find_stop(old_len)
        if stop is not None:
            stop_str, index = stop
            end = index + len(stop_str) if self.include_stop_str_in_output else index
            self._text = self._text[:end]
            self.stop_str, self._finished = stop_str, True
            return DetokenizerUpdate(self._emit(len(self._text)), stop_str)
        limit = len(self._text) if final else len(self._text) - self._hold_len
        return DetokenizerUpdate(self._emit(limit))

    def _emit(self, limit: int) -> str:
        limit = max(limit, self._num_emitted)
        delta = self._text[self._num_emitted:limit]
        self._num_emitted = limit
        return delta

    def _find_stop(self, old_len: int) -> Optional[tuple[str, int]]:
        """Earliest stop string that ends in the newly decoded text: (stop string, start index)."""
        best: Optional[tuple[str, int]] = None
        for stop_str in self.stop:
            # A match must end after old_len (earlier text was already searched).
            start = max(0, old_len - len(stop_str) + 1)
            index = self._text.find(stop_str, start)
            if index != -1 and (best is None or index < best[1]):
                best = (stop_str, index)
        return best
