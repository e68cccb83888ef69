"""The AR-vs-HF ``generate`` benchmark's CPU smoke path: both sides run on one checkpoint
directory, the JSON holds a row per batch, and in fp32 the greedy tokens agree."""

from __future__ import annotations

import json

from optimus.bench.experiments import hf_generate_compare


def test_smoke_run_writes_rates_and_ratio(tmp_path):
    assert hf_generate_compare.main(["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "hf_generate_compare.json").read_text())
    assert (tmp_path / "hf_generate_compare.png").stat().st_size > 0
    assert not (tmp_path / "smollm2-135m-shape").exists()
    assert [r["batch"] for r in result["rows"]] == [1, 4] and result["gen_len"] == 8
    for row in result["rows"]:
        assert row["output_tokens"] == [row["batch"] * 8] * 2  # end-of-text ignored on both sides
        assert row["optimus_tok_s"] > 0 and row["hf_tok_s"] > 0
        assert abs(row["ratio"] - row["optimus_tok_s"] / row["hf_tok_s"]) < 1e-9
        assert row["first_request_same_prefix"] == 8  # fp32: the same greedy decode


def test_the_full_run_uses_smollm2_135m_shape():
    c = hf_generate_compare.SMOLLM2_135M
    assert (c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"],
            c["vocab_size"], c["tie_word_embeddings"]) == (30, 576, 9, 3, 49152, True)
