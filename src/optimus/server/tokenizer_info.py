"""``GET /tokenizer_info``: the tokenizer's configuration as vLLM serves it (the
``tokenizer_config.json`` fields, AddedTokens as their strings, plus ``tokenizer_class`` and the
chat template). lm-eval's ``tokenizer_backend=remote`` reads ``eos_token``, ``bos_token``,
``pad_token`` and ``chat_template`` here and tokenizes through ``/tokenize`` and ``/detokenize``.
Behind the API key and the Host/Origin checks like ``/tokenize``."""

from __future__ import annotations

from fastapi import APIRouter, Request

from optimus.server.state import ServerState

router = APIRouter()

_ROLES = ("bos", "eos", "pad", "unk", "mask")
# Ours is always a fast (``tokenizers``-backed) tokenizer, whatever class the checkpoint names.
TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def tokenizer_info(tokenizer, max_model_len: int) -> dict:
    settings = tokenizer.settings
    info: dict = {"tokenizer_class": TOKENIZER_CLASS}
    info.update({f"{role}_token": tokenizer.special_token(role) for role in _ROLES})
    info.update(add_bos_token=settings.add_bos_token, add_eos_token=settings.add_eos_token,
                clean_up_tokenization_spaces=settings.clean_up_tokenization_spaces,
                model_max_length=max_model_len,
                added_tokens_decoder=_added_tokens(tokenizer))
    templates = settings.chat_templates
    if templates:
        info["chat_template"] = templates.get("default", next(iter(templates.values())))
    return info


def _added_tokens(tokenizer) -> dict[str, str]:
    """id -> token for tokenizer_config's added tokens and every special token."""
    added = {i: content for i, (content, _) in tokenizer.settings.added_tokens.items()}
    added.update({i: tokenizer.id_to_token(i) for i in tokenizer.all_special_ids})
    return {str(i): added[i] for i in sorted(added)}


@router.get("/tokenizer_info")
async def get_tokenizer_info(request: Request) -> dict:
    state: ServerState = request.app.state.optimus
    state.admit(None)
    return tokenizer_info(state.engine.tokenizer, state.engine.max_model_len)
