"""Turn request prompts into token ids and settle ``max_tokens`` against the context length."""

from __future__ import annotations

from dataclasses import dataclass

from optimus.server.errors import bad_request

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions


@dataclass(frozen=True)
class PromptLimits:
    vocab_size: int
    max_model_len: int
    max_tokens_cap: int


def completion_prompts(prompt: str | list, tokenizer, limits: PromptLimits) -> list[list[int]]:
    """``prompt`` as a string, a list of strings, token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        batch: list = [prompt]
    elif not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    elif isinstance(prompt[0], int):
        batch = [prompt]
    else:
        batch = list(prompt)
    return [_prompt_ids(p, tokenizer, limits, f"prompt.{i}" if len(batch) > 1 else "prompt")
            for i, p in enumerate(batch)]


def chat_prompt(messages: list[dict[str, str]], tokenizer, limits: PromptLimits) -> list[int]:
    return _prompt_ids(render_chat(messages, tokenizer), tokenizer, limits, "messages")


def render_chat(messages: list[dict[str, str]], tokenizer, add_generation_prompt: bool = True) -> str:
    """The conversation through the model's chat template; a template that rejects it is a 400."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except (ValueError, TypeError, KeyError) as exc:
        raise bad_request(f"messages: chat template failed: {exc}", "messages") from None
    except Exception as exc:  # jinja2's TemplateError and the template's own raise_exception
        if type(exc).__module__.startswith("jinja2"):
            raise bad_request(f"messages: chat template failed: {exc}", "messages") from None
        raise


def _prompt_ids(prompt: str | list[int], tokenizer, limits: PromptLimits, param: str) -> list[int]:
    if isinstance(prompt, str):
        ids = list(tokenizer.encode(prompt))
    else:
        ids = list(prompt)
        bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            raise bad_request(f"{param}: token id {bad} is outside the vocabulary "
                              f"[0, {limits.vocab_size})", param)
    if not ids:
        raise bad_request(f"{param}: prompt must contain at least one token", param)
    if len(ids) >= limits.max_model_len:
        raise bad_request(f"{param}: this model's maximum context length is {limits.max_model_len} "
                          f"tokens, but the prompt has {len(ids)} tokens", param,
                          code="context_length_exceeded")
    return ids


def check_stop_token_ids(ids: list[int] | None, limits: PromptLimits) -> None:
    bad = next((t for t in ids or () if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise bad_request(f"stop_token_ids: token id {bad} is outside the vocabulary "
                          f"[0, {limits.vocab_size})", "stop_token_ids")


def call_token_budget(requested: int | None, sequences: int, max_call_tokens: int) -> int:
    """Tokens each of a call's ``sequences`` may generate under ``max_call_tokens`` (the bound
    on the work one HTTP request creates); an explicit ask beyond it is a 400."""
    per_sequence = max_call_tokens // sequences
    if per_sequence < 1 or (requested is not None and requested > per_sequence):
        asked = f"{sequences} x max_tokens={requested}" if requested is not None else f"{sequences} sequences"
        raise bad_request(f"max_tokens: this call asks for {asked}, over this server's limit of "
                          f"{max_call_tokens} generated tokens per request (--max-call-tokens); "
                          "send fewer prompts, a smaller n or a smaller max_tokens", "max_tokens")
    return per_sequence


def resolve_max_tokens(requested: int | None, prompt_len: int, limits: PromptLimits,
                       default: int | None) -> int:
    """Tokens to generate: explicit values must fit the cap and the context; a missing value
    becomes ``default`` (None: as much as the context allows), clamped to both."""
    room = limits.max_model_len - prompt_len
    if requested is None:
        wanted = default if default is not None else room
        return max(1, min(wanted, room, limits.max_tokens_cap))
    if requested > limits.max_tokens_cap:
        raise bad_request(f"max_tokens: {requested} exceeds this server's cap of "
                          f"{limits.max_tokens_cap}", "max_tokens")
    if requested > room:
        raise bad_request(f"max_tokens: this model's maximum context length is {limits.max_model_len} "
                          f"tokens; the prompt has {prompt_len} and {requested} were requested for "
                          "the completion", "max_tokens", code="context_length_exceeded")
    return requested
