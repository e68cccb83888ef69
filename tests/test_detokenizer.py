from optimus.models.detokenizer import IncrementalDetokenizer
from fixtures.engine import tiny_loaded


def test_incremental_text_equals_full_decode():
    tok = tiny_loaded("sdar").tokenizer
    text = "Héllo wörld, diffusion 123 — ✓ done."
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    seen = []
    for n in range(1, len(ids) + 1):
        seen.append(detok.update(ids[:n]))
        assert tok.decode(ids[:n]).startswith(seen[-1].rstrip("\ufffd"))
    assert detok.finish(ids) == tok.decode(ids)
    assert all(a == b[:len(a)] for a, b in zip(seen, seen[1:]))  # text only ever grows
