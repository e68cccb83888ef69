"""The default model's special tokens and ChatML-style chat format.

A turn is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; the generation prompt ends with
``<|im_start|>assistant\\n``; an answer ends with ``<|im_end|>`` and the rest of its block is
filled with ``<|endoftext|>`` (SDAR's convention, so a finished block decodes confidently).
"""

from __future__ import annotations

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
MASK = "<|mask|>"
# Order fixes the ids 0..3 of the vocabulary.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, MASK)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def render_prompt(question: str, system: str | None = None) -> str:
    """The text the template renders for one user turn plus the generation prompt."""
    turns = [("system", system)] if system else []
    turns.append(("user", question))
    body = "".join(f"{IM_START}{role}\n{content}{IM_END}\n" for role, content in turns)
    return body + f"{IM_START}assistant\n"


def render_answer(answer: str) -> str:
    return answer + IM_END
