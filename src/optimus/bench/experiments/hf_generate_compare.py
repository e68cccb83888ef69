"""The AR baseline against Hugging Face ``generate``, on SmolLM2-135M-Instruct's shape.

Random weights at the real model's config (30 layers, hidden 576, 9/3 heads, tied embeddings,
vocab 49,152) are saved as one checkpoint directory that both sides load: this engine's ``ar``
policy (CUDA graphs, paged KV cache, overlapped steps) and transformers' ``generate`` (greedy,
SDPA attention, its default dynamic cache). Same prompts (random ids, equal lengths, so no
padding), same output length, end-of-text ignored on both sides; output tokens per second at
each batch size and this engine's ratio to HF, written to ``<out>/hf_generate_compare.json``
(+ a PNG). No network: nothing is downloaded.

  PYTHONPATH=src python -m optimus.bench.experiments.hf_generate_compare --out results/hf_compare
  PYTHONPATH=src python -m optimus.bench.experiments.hf_generate_compare --smoke --out /tmp/x  # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# HuggingFaceTB/SmolLM2-135M-Instruct's config.json (the architecture fields).
SMOLLM2_135M = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5,
                    max_position_embeddings=8192, hidden_act="silu", attention_bias=False, mlp_bias=False,
                    bos_token_id=1, eos_token_id=2, pad_token_id=2)
# --smoke: the same layout shrunk to milliseconds (its vocab still holds the tokenizer's ids).
SMOKE = dict(SMOLLM2_135M, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=9216, max_position_embeddings=512)


@dataclass(frozen=True)
class Run:
    batch: int
    prompt_len: int
    gen_len: int
    device: str
    dtype: torch.dtype


def write_checkpoint(config: dict, directory: Path, dtype: torch.dtype, seed: int = 0) -> Path:
    """Random weights at ``config`` saved by transformers (the layout both sides read), with the
    shipped model's tokenizer files (the engine's loader wants a tokenizer; ids are fed directly)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from optimus.default_model import default_model_dir

    torch.manual_seed(seed)
    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    model = LlamaForCausalLM(LlamaConfig(**fields)).to(dtype)
    model.save_pretrained(str(directory))  # safetensors
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(default_model_dir()) / name, directory / name)
    return directory


def prompts(run: Run, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(run.prompt_len)] for _ in range(run.batch)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_optimus(llm, run: Run, vocab: int) -> dict:
    from optimus.core.params import SamplingParams

    params = SamplingParams(max_tokens=run.gen_len, ignore_eos=True)
    llm.generate(prompts(run, vocab, seed=1), params)  # warm-up: every CUDA-graph bucket of this batch
    batch = prompts(run, vocab, seed=0)
    _sync(run.device)
    t0 = time.perf_counter()
    outs = llm.generate(batch, params)
    _sync(run.device)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    return {"tok_s": tokens / wall, "wall_s": wall, "output_tokens": tokens, "first": list(outs[0].token_ids)}


@torch.no_grad()
def time_hf(model, run: Run, vocab: int) -> dict:
    def generate(ids: list[list[int]]) -> torch.Tensor:
        x = torch.tensor(ids, device=run.device)
        # min_new_tokens = max_new_tokens: end-of-text is masked until the length is reached.
        return model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                              max_new_tokens=run.gen_len, min_new_tokens=run.gen_len, pad_token_id=0)

    generate(prompts(run, vocab, seed=1))  # warm-up (kernels, allocator) at the same shapes
    batch = prompts(run, vocab, seed=0)
    _sync(run.device)
    t0 = time.perf_counter()
    out = generate(batch)
    _sync(run.device)
    wall = time.perf_counter() - t0
    new = out[:, run.prompt_len:]
    return {"tok_s": new.numel() / wall, "wall_s": wall, "output_tokens": new.numel(), "first": new[0].tolist()}


def compare(config: dict, batches: list[int], prompt_len: int, gen_len: int, device: str, out: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from optimus.engine.llm import LLM

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    ckpt = write_checkpoint(config, out / "smollm2-135m-shape", dtype)
    vocab = config["vocab_size"]
    llm = LLM(str(ckpt), policy="ar", device=device, dtype=str(dtype).removeprefix("torch."),
              max_running=max(batches), graph_precapture=device.startswith("cuda"))
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype, attn_implementation="sdpa").to(device).eval()
    rows = []
    for batch in batches:
        run = Run(batch, prompt_len, gen_len, device, dtype)
        ours, theirs = time_optimus(llm, run, vocab), time_hf(hf, run, vocab)
        same = next((i for i, (a, b) in enumerate(zip(ours["first"], theirs["first"])) if a != b), gen_len)
        rows.append({"batch": batch, "optimus_tok_s": ours["tok_s"], "hf_tok_s": theirs["tok_s"],
                     "ratio": ours["tok_s"] / theirs["tok_s"], "optimus_wall_s": ours["wall_s"],
                     "hf_wall_s": theirs["wall_s"], "output_tokens": [ours["output_tokens"], theirs["output_tokens"]],
                     # greedy agreement of request 0 (bf16 ties on random weights may split them)
                     "first_request_same_prefix": same})
        print(f"batch {batch:>4}: optimus {ours['tok_s']:10.1f} tok/s   HF generate {theirs['tok_s']:10.1f} tok/s   "
              f"ratio {rows[-1]['ratio']:.2f}x   same greedy prefix {same}/{gen_len}", flush=True)
    import transformers
    return {"experiment": "hf_generate_compare", "model_shape": "SmolLM2-135M-Instruct (random weights)",
            "config": config, "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "dtype": str(dtype), "torch": torch.__version__, "transformers": transformers.__version__,
            "prompt_len": prompt_len, "gen_len": gen_len, "policy": "ar", "hf": "generate, greedy, sdpa, dynamic cache",
            "rows": rows}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [r["batch"] for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(batches, [r["optimus_tok_s"] for r in result["rows"]], "o-", label="optimus ar")
    ax.plot(batches, [r["hf_tok_s"] for r in result["rows"]], "s-", label="HF generate")
    ax.set(xscale="log", yscale="log", xlabel="batch (requests)", ylabel="output tokens/s",
           title=f"SmolLM2-135M shape, {result['device']}, out {result['gen_len']}")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the JSON, the PNG and the checkpoint")
    p.add_argument("--batches", default="1,64,512", help="comma-separated batch sizes (default: 1,64,512)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=256, help="output tokens per request (default: 256)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU: batches 1,4, prompt 16, output 8")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        config, batches, prompt_len, gen_len, device = SMOKE, [1, 4], 16, 8, args.device or "cpu"
    else:
        config, batches = SMOLLM2_135M, [int(b) for b in args.batches.split(",") if b]
        prompt_len, gen_len, device = args.prompt_len, args.gen_len, args.device or "cuda"
    result = compare(config, batches, prompt_len, gen_len, device, out)
    (out / "hf_generate_compare.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "hf_generate_compare.png")
    shutil.rmtree(out / "smollm2-135m-shape", ignore_errors=True)  # random weights: not worth keeping
    print(f"wrote {out / 'hf_generate_compare.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
