"""Request bodies of the OpenAI-compatible API as strict pydantic models.

Unknown fields are refused (OpenAI's "Unrecognized request argument"), and fields we know but
cannot honour (``logprobs``, ``tools``, ``response_format``, penalties...) are accepted only at
their neutral value: anything else is a 400 that says so, never a silent ignore."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from optimus.core.params import SamplingParams
from optimus.core.scoring import MAX_TOP_N
from optimus.server.errors import APIError, bad_request

# SamplingParams field -> the request field a client set (for error messages and ``param``).
_REQUEST_NAME = {"rule": "decoding_rule"}


def require_unicode(value: Any) -> Any:
    """Refuse strings that are not valid Unicode text (a lone surrogate such as "\\ud800" is
    legal JSON but cannot be encoded or tokenized), anywhere inside a field's value."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("contains a lone surrogate (not valid Unicode text)") from None
    elif isinstance(value, (list, tuple)):
        for item in value:
            require_unicode(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            require_unicode(key)
            require_unicode(item)
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    _text_is_unicode = field_validator("*")(classmethod(lambda cls, v: require_unicode(v)))


class StreamOptions(_Strict):
    include_usage: bool = False


class GenerationRequest(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # -1 or 0: disabled
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # Optimus extensions: how a step commits positions, and a per-request chunk policy.
    decoding_rule: str | None = None  # threshold | topk | factor
    threshold: float | None = None
    tokens_per_step: int | None = None
    factor: float | None = None
    policy: str | None = None  # ar | fixed:C | elastic

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def reject_unsupported(self) -> None:
        """Raise a 400 naming the first field set to something we cannot honour."""
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0.0):
                raise _unsupported(name, "penalties are not supported by diffusion decoding")
        if self.logit_bias:
            raise _unsupported("logit_bias", "logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")

    def sampling_params(self, max_tokens: int, choice: int) -> SamplingParams:
        """Engine parameters for choice ``choice`` (seeded choices get seed + choice)."""
        kw: dict[str, Any] = {
            "max_tokens": max_tokens,
            "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens,
            "skip_special_tokens": self.skip_special_tokens,
            "stop": (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            "stop_token_ids": tuple(self.stop_token_ids or ()),
        }
        optional = {"temperature": self.temperature, "top_p": self.top_p, "rule": self.decoding_rule,
                    "threshold": self.threshold, "tokens_per_step": self.tokens_per_step,
                    "factor": self.factor, "policy": self.policy}
        kw.update({k: v for k, v in optional.items() if v is not None})
        if self.top_k is not None:
            kw["top_k"] = 0 if self.top_k == -1 else self.top_k
        if self.seed is not None:  # choice i of a call: seed + i, wrapping inside [0, 2^63)
            kw["seed"] = (self.seed + choice) % 2**63 if self.seed >= 0 else self.seed
        try:
            return SamplingParams(**kw)
        except (ValueError, TypeError) as exc:
            raise param_error(str(exc)) from None


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0: score the prompt only (with echo)
    echo: bool = False
    logprobs: int | None = None  # alternatives per token (0..MAX_TOP_N); server/scored.py
    suffix: str | None = None
    best_of: int | None = None

    @property
    def scored(self) -> bool:
        """Echo or logprobs: answered by ``server/scored.py`` (never streamed)."""
        return self.echo or self.logprobs is not None

    def reject_unsupported(self) -> None:
        super().reject_unsupported()
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_N:
            raise bad_request(f"logprobs: must be between 0 and {MAX_TOP_N}, got {self.logprobs}", "logprobs")
        if self.max_tokens == 0 and not self.echo:
            raise bad_request("max_tokens: must be at least 1 (0 only with echo, to score the prompt)",
                              "max_tokens")
        if self.stream and self.scored:
            raise _unsupported("echo" if self.echo else "logprobs",
                               "echo and logprobs are not supported with stream; send stream: false")
        if self.suffix:
            raise _unsupported("suffix", "suffix (insertion) is not supported")
        if self.best_of not in (None, 1, self.n):
            raise _unsupported("best_of", "best_of is not supported; use n")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None

    _text_is_unicode = field_validator("*")(classmethod(lambda cls, v: require_unicode(v)))


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        """The message as plain text; non-text parts and tool messages are refused."""
        where = f"messages.{index}"
        if self.role == "tool":
            raise _unsupported(f"{where}.role", "tool messages are not supported")
        if self.content is None:
            raise bad_request(f"{where}.content: a message needs content", f"{where}.content")
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise _unsupported(f"{where}.content", f"content part type {part.type!r} is not "
                                                       "supported; only text parts are")
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    echo: bool = False  # vLLM's field; refused (no chat scoring)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def reject_unsupported(self) -> None:
        super().reject_unsupported()
        if self.echo:
            raise _unsupported("echo", "echo is not supported on chat completions; use /v1/completions "
                                       "with echo on the rendered prompt (POST /tokenize renders it)")
        if self.logprobs or self.top_logprobs is not None:
            raise _unsupported("logprobs", "logprobs are not supported on chat completions; use "
                                           "/v1/completions with logprobs (and echo) on the rendered prompt")
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise _unsupported(name, "tool calling is not supported")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise _unsupported(name, "tool calling is not supported")
        if self.parallel_tool_calls:
            raise _unsupported("parallel_tool_calls", "tool calling is not supported")
        if self.response_format not in (None, {"type": "text"}):
            raise _unsupported("response_format", "structured output (response_format) is not "
                                                  "supported; only {'type': 'text'}")

    def chat(self) -> list[dict[str, str]]:
        return chat_dicts(self.messages)


def chat_dicts(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat template reads them (``name`` kept for templates that use it)."""
    out = []
    for i, m in enumerate(messages):
        turn = {"role": m.role, "content": m.text(i)}
        if m.name is not None:
            turn["name"] = m.name
        out.append(turn)
    return out


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None  # None: as /v1/completions tokenizes a prompt
    return_token_strs: bool = False  # vLLM's field: also each token's text


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def _unsupported(param: str, message: str) -> APIError:
    return bad_request(message, param=param, code="unsupported_parameter")


def param_error(message: str) -> APIError:
    field, sep, rest = message.partition(": ")
    if sep and field.isidentifier():
        name = _REQUEST_NAME.get(field, field)
        return bad_request(f"{name}: {rest}", param=name)
    return bad_request(message)
