"""Incremental detokenization: each update decodes a short window, not the whole answer.

Byte-level BPE can split one character across tokens; a window whose text ends in U+FFFD
is held back until the next token completes it. Invariant: ``text`` is the decode of
``ids[:read_offset]``; ``prefix_offset <= read_offset`` starts the context window used to
decode new tokens (tokenizers may render a token differently after a space).
"""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True, context: int = 4) -> None:
        self.tokenizer, self.skip, self.context = tokenizer, skip_special_tokens, context
        self.text = ""
        self.prefix_offset = 0
        self.read_offset = 0

    def update(self, ids: Sequence[int]) -> str:
        """Feed the whole answer so far (it only ever grows); returns the text so far."""
        if len(ids) <= self.read_offset:
            return self.text
        prefix = self.tokenizer.decode(ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip)
        full = self.tokenizer.decode(ids[self.prefix_offset:], skip_special_tokens=self.skip)
        if full.endswith("\ufffd") or not full.startswith(prefix):
            return self.text  # an incomplete character: wait for more tokens
        self.text += full[len(prefix):]
        self.read_offset = len(ids)
        self.prefix_offset = max(self.prefix_offset, self.read_offset - self.context)
        return self.text

    def finish(self, ids: Sequence[int]) -> str:
        """Final text: whatever is left, incomplete characters included."""
        full = self.tokenizer.decode(ids[self.prefix_offset:], skip_special_tokens=self.skip)
        prefix = self.tokenizer.decode(ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip)
        if len(ids) > self.read_offset and full.startswith(prefix):
            self.text += full[len(prefix):]
            self.read_offset = len(ids)
        return self.text
