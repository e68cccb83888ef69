"""Tokenizer: lossless round trips, special tokens as the files specify, chat templates in a sandbox."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from fixtures.checkpoints import role_ids
from optimus.models.tokenizer import ChatTemplateError, Tokenizer, TokenizerError

from conftest import ALL_FAMILIES

TEXTS = ["hello world", "  leading and trailing  ", "the answer is four.\n\ndef f(x):\n\treturn x",
         "héllo wörld, 你好 👋", ""]
CHAT = [{"role": "user", "content": "What is two plus two?"}]


@pytest.fixture
def tokenizer_for(tiny_checkpoint):
    def make(family: str, **config_changes) -> Tokenizer:
        path = tiny_checkpoint(family)
        if config_changes:
            _edit_tokenizer_config(path, **config_changes)
        return Tokenizer.from_dir(path)
    return make


def _edit_tokenizer_config(path: Path, **changes) -> None:
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(changes)
    (path / "tokenizer_config.json").write_text(json.dumps(config))


# ------------------------------------------------------------------ text <-> ids

@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_round_trip_is_lossless(family, tokenizer_for):
    tok = tokenizer_for(family)
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def test_merges_compress_common_words(tokenizer_for):
    tok = tokenizer_for("qwen2")
    assert len(tok.encode(" the the the")) == 3  # " the" is one learned token
    assert len(tok.encode("zzz")) == 3  # unseen text falls back to bytes


def test_special_tokens_are_single_ids_at_the_config_ids(tokenizer_for):
    tok = tokenizer_for("llada")
    r = role_ids("llada")
    assert tok.encode("<|mdm_mask|>") == [r["mask"]]
    assert tok.mask_token_id is None  # LLaDA's tokenizer_config names no mask_token...
    assert tok.token_to_id("<|mdm_mask|>") == r["mask"]  # ...the config's mask_token_id does
    assert tok.bos_token_id == r["bos"] and tok.eos_token_id == r["eos"]
    assert tok.end_of_turn_id == r["eot"]
    assert tok.id_to_token(r["eot"]) == "<|eot_id|>"
    assert {r["mask"], r["eot"], r["bos"], r["eos"]} <= set(tok.all_special_ids)


def test_dream_names_its_mask_token(tokenizer_for):
    tok = tokenizer_for("dream")
    assert tok.mask_token_id == role_ids("dream")["mask"] == tok.token_to_id("<|mask|>")


def test_decode_skips_special_tokens_by_default(tokenizer_for):
    tok = tokenizer_for("sdar")
    ids = tok.encode("hi<|im_end|><|MASK|> there")
    assert tok.decode(ids) == "hi there"
    assert tok.decode(ids, skip_special_tokens=False) == "hi<|im_end|><|MASK|> there"


def test_decode_ignores_padded_vocab_rows(tokenizer_for):
    """Model vocab (384) is padded past the tokenizer's: such ids decode to nothing."""
    tok = tokenizer_for("llama")
    assert tok.vocab_size < 384
    assert tok.decode(tok.encode("ab") + [383]) == "ab"


def test_add_special_tokens_follows_the_files(tokenizer_for):
    llada = tokenizer_for("llada")  # tokenizer.json's post-processor prepends bos
    assert llada.encode("hi", add_special_tokens=True) == [llada.bos_token_id] + llada.encode("hi")
    qwen = tokenizer_for("qwen3")  # no bos at all
    assert qwen.encode("hi", add_special_tokens=True) == qwen.encode("hi")


def test_add_bos_and_eos_token_settings(tokenizer_for):
    tok = tokenizer_for("dream", add_bos_token=True, add_eos_token=True)
    plain = tok.encode("hi")
    assert tok.encode("hi", add_special_tokens=True) == [tok.bos_token_id] + plain + [tok.eos_token_id]
    assert tok.encode("hi") == plain
    once = tokenizer_for("llada", add_bos_token=True)  # post-processor already added it: not twice
    assert once.encode("hi", add_special_tokens=True).count(once.bos_token_id) == 1


def test_generation_config_eos_ids(tokenizer_for):
    tok = tokenizer_for("qwen2")
    assert tok.eos_token_ids == (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"))


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match=r"missing file: .*tokenizer.json \(nor vocab.json"):
        Tokenizer.from_dir(tmp_path)


def test_added_token_only_in_config_is_registered(tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    config = json.loads((path / "tokenizer_config.json").read_text())
    next_id = Tokenizer.from_dir(path).vocab_size
    config["added_tokens_decoder"][str(next_id)] = {"content": "<|extra|>", "special": True}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(path)
    assert tok.encode("a<|extra|>")[1:] == [next_id] and next_id in tok.all_special_ids
    assert tok.decode(tok.encode("a<|extra|>")) == "a"
    config["added_tokens_decoder"][str(next_id + 5)] = {"content": "<|gap|>", "special": True}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=f"puts '<\\|gap\\|>' at id {next_id + 5}"):
        Tokenizer.from_dir(path)


@pytest.mark.parametrize("family", ["dream", "qwen2"])
def test_vocab_and_merges_without_tokenizer_json(family, tiny_checkpoint):
    """Dream ships vocab.json + merges.txt (specials only in tokenizer_config): same ids as the
    tokenizer.json form, and as transformers' own Qwen2 tokenizer over the same files."""
    files = tiny_checkpoint(family, tokenizer_format="vocab_merges")
    assert not (files / "tokenizer.json").exists()
    slow, fast = Tokenizer.from_dir(files), Tokenizer.from_dir(tiny_checkpoint(family))
    texts = TEXTS + ["I'm 12345 years old!!\n\n  ok", slow.apply_chat_template(CHAT)]
    for text in texts:
        assert slow.encode(text) == fast.encode(text)
        assert slow.decode(slow.encode(text), skip_special_tokens=False) == text
    assert slow.mask_token_id == fast.mask_token_id and slow.eos_token_ids == fast.eos_token_ids
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(files))
    for text in texts:
        assert slow.encode(text) == reference(text, add_special_tokens=False)["input_ids"]


def test_vocab_and_merges_need_a_known_class(tiny_checkpoint):
    path = tiny_checkpoint("qwen3", tokenizer_format="vocab_merges")
    _edit_tokenizer_config(path, tokenizer_class="GPT2Tokenizer")
    with pytest.raises(TokenizerError, match="tokenizer_class='GPT2Tokenizer'"):
        Tokenizer.from_dir(path)


# ------------------------------------------------------------------ chat templates

def test_llada_header_template(tokenizer_for):
    tok = tokenizer_for("llada")
    text = tok.apply_chat_template([{"role": "user", "content": "  Hi there \n"}])
    assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    two = tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                  add_generation_prompt=False)
    assert two.count("<|startoftext|>") == 1 and two.endswith("assistant<|end_header_id|>\n\nb<|eot_id|>")


def test_chatml_templates(tokenizer_for):
    dream = tokenizer_for("dream").apply_chat_template(CHAT)
    assert dream == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                     "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n")
    sdar = tokenizer_for("sdar").apply_chat_template(CHAT, add_generation_prompt=False)
    assert sdar == "<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
    system = [{"role": "system", "content": "Be brief."}] + CHAT
    assert tokenizer_for("qwen2").apply_chat_template(system).startswith("<|im_start|>system\nBe brief.<|im_end|>")


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_templates_render_like_transformers(family, tiny_checkpoint):
    transformers = pytest.importorskip("transformers")
    path = tiny_checkpoint(family)
    ours, theirs = Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(str(path))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " hi "},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "two plus two?"}]
    for messages in (chat, chat[1:2]):
        for gen in (True, False):
            expected = theirs.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected
    text = ours.apply_chat_template(chat)
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
    assert ours.encode(text, add_special_tokens=True) == theirs(text)["input_ids"]


def test_named_templates_and_jinja_file(tiny_checkpoint):
    path = tiny_checkpoint("qwen3")
    _edit_tokenizer_config(path, chat_template=[{"name": "default", "template": "D{{ messages|length }}"},
                                                {"name": "tool_use", "template": "T{{ tools|length }}"}])
    tok = Tokenizer.from_dir(path)
    assert tok.apply_chat_template(CHAT) == "D1"
    assert tok.apply_chat_template(CHAT, template_name="tool_use", tools=[1, 2]) == "T2"
    with pytest.raises(ChatTemplateError, match="no chat template named 'nope'"):
        tok.apply_chat_template(CHAT, template_name="nope")
    (path / "chat_template.jinja").write_text("J{{ messages[0]['role'] }}")
    assert Tokenizer.from_dir(path).apply_chat_template(CHAT) == "Juser"


def test_no_chat_template_is_a_clear_error(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    _edit_tokenizer_config(path, chat_template=None)
    tok = Tokenizer.from_dir(path)
    assert not tok.has_chat_template
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        tok.apply_chat_template(CHAT)


def _render(tiny_checkpoint, template: str, messages=CHAT, **kwargs) -> str:
    path = tiny_checkpoint("qwen2")
    _edit_tokenizer_config(path, chat_template=template)
    return Tokenizer.from_dir(path).apply_chat_template(messages, **kwargs)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ messages.__class__.__base__ }}",
])
def test_sandbox_refuses_attribute_escapes(template, tiny_checkpoint):
    with pytest.raises(ChatTemplateError, match="sandbox"):
        _render(tiny_checkpoint, template)


def test_sandbox_refuses_mutation(tiny_checkpoint):
    with pytest.raises(ChatTemplateError, match="sandbox"):
        _render(tiny_checkpoint, "{{ messages.append({'role': 'user'}) }}")


def test_raise_exception_helper(tiny_checkpoint):
    template = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system turn is required') }}{% endif %}"
    with pytest.raises(ChatTemplateError, match="a system turn is required"):
        _render(tiny_checkpoint, template)


def test_template_helpers_and_whitespace_control(tiny_checkpoint):
    assert _render(tiny_checkpoint, "{{ strftime_now('%Y') }}") == str(datetime.date.today().year)
    quoted = _render(tiny_checkpoint, "{{ messages[0]['content'] | tojson }}",
                     messages=[{"role": "user", "content": "<a & 'b'> é"}])
    assert quoted == '"<a & \'b\'> é"'  # plain JSON, no HTML escaping, no ASCII escaping
    trimmed = _render(tiny_checkpoint, "{% for m in messages %}\n    {% if true %}\n{{ m['role'] }}\n{% endif %}\n{% endfor %}")
    assert trimmed == "user\n"
    assert _render(tiny_checkpoint, "{{ bos_token }}|{{ eos_token }}|{{ flag }}", flag=7) == "|<|im_end|>|7"
    assert _render(tiny_checkpoint, "{% for m in messages %}{% break %}{% endfor %}ok") == "ok"


def test_template_syntax_error_is_reported(tiny_checkpoint):
    with pytest.raises(ChatTemplateError, match="does not parse"):
        _render(tiny_checkpoint, "{% for m in messages %}")
