"""The training loop: sample packed rows, noise them, run the model over [noisy, clean],
step AdamW under a warmup + cosine schedule driven by steps or wall-clock, log, save."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from optimus_lab.train import checkpoint, convert
from optimus_lab.train.convert import Conversion
from optimus_lab.train.attention import DenseMasks, FlexMasks, TrainBackend
from optimus_lab.train.objective import NoisedBatch, chunk_segments, masked_ce, noise, weighted_loss
from optimus_lab.train.pack import load_rows


@dataclass(frozen=True)
class TrainConfig:
    data_dir: Path
    out_dir: Path
    shape: checkpoint.ModelShape = field(default_factory=checkpoint.ModelShape)
    seq_len: int = 512
    batch_size: int = 128
    text_fraction: float = 0.3  # share of each batch drawn from text rows (rest: chat rows)
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 300
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eps: float = 1e-3  # lower bound of the per-block mask ratio
    chunk_mix: float = 0.0  # share of blocks cut into decoding-like chunks (objective.chunk_segments)
    max_steps: int = 10**9
    train_seconds: float = float("inf")  # the schedule ends at whichever limit comes first
    log_every: int = 50
    val_every: int = 0  # steps between held-out text losses in the log (0: only at the end)
    keep_best: bool = False  # end on the trained weights of the lowest held-out loss seen (needs val_every)
    seed: int = 0
    device: str = "cuda"
    compile: bool = True
    attention: str = "flex"  # "flex" (GPU) or "mask" (dense SDPA)
    max_shard_bytes: int | None = None
    init_dir: Path | None = None  # start from this HF directory's weights (fine-tuning) instead of random
    conversion: "Conversion | None" = None  # convert a pretrained AR model (low-rank adapter) instead
    heldout: str = "text_val"  # the held-out rows the log reports a loss on


class _Best:
    """The trained parameters (those with gradients: the adapter of a conversion) at the lowest
    held-out loss so far, copied to the CPU; a long run that starts to overfit ends on them."""

    def __init__(self) -> None:
        self.step, self.loss, self.weights = 0, float("inf"), None

    def offer(self, model: torch.nn.Module, step: int, loss: float) -> None:
        if loss < self.loss:
            self.step, self.loss = step, loss
            self.weights = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def restore(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, value in self.weights.items():
            params[name].copy_(value)


class RowSampler:
    """Random rows from the text and chat arrays, held on the training device."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        def load(name: str) -> torch.Tensor:
            path = cfg.data_dir / f"{name}.bin.gz"
            if not path.exists():  # a chat-only data set (self-generated conversations)
                return torch.zeros(0, cfg.seq_len, dtype=torch.int64, device=device)
            return torch.from_numpy(load_rows(path, cfg.seq_len)).to(device)
        self.text, self.chat = load("text_train"), load("chat_train")
        self.n_text = round(cfg.batch_size * cfg.text_fraction) if len(self.text) else 0
        self.n_chat = cfg.batch_size - self.n_text
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)

    def next(self) -> torch.Tensor:
        parts = []
        for rows, n in ((self.text, self.n_text), (self.chat, self.n_chat)):
            if n:
                idx = torch.randint(len(rows), (n,), device=rows.device, generator=self.gen)
                parts.append(rows[idx])
        return torch.cat(parts)


def init_weights(model: torch.nn.Module, num_layers: int, std: float = 0.02) -> None:
    """GPT-2 style: N(0, std) matrices and embeddings, residual outputs scaled by 1/sqrt(2L)."""
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue  # norm weights stay at 1
        scale = 1 / math.sqrt(2 * num_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
        torch.nn.init.normal_(p, 0.0, std * scale)


def lr_factor(cfg: TrainConfig, step: int, elapsed: float) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, max(step / cfg.max_steps, elapsed / cfg.train_seconds))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        meta = json.loads((cfg.data_dir / "meta.json").read_text())
        torch.manual_seed(cfg.seed)
        if cfg.conversion is not None:  # the data set names the ids (selfchat.write_dataset)
            self.hf_config, self.model = convert.build(cfg.conversion, meta["ids"], cfg.shape.block_size)
        else:
            self.hf_config, self.model = self._fresh_model(cfg, meta)
        self.model.to(self.device)
        self.mask_id, self.block = self.hf_config["mask_token_id"], cfg.shape.block_size
        self.sampler = RowSampler(cfg, self.device)
        self.opt = self._optimizer()
        masks_cls = FlexMasks if cfg.attention == "flex" else DenseMasks
        self.masks = masks_cls(cfg.batch_size, cfg.seq_len, self.block, self.device)
        self.step_fn = torch.compile(self._loss) if cfg.compile else self._loss
        self.log: list[dict] = []

    @staticmethod
    def _fresh_model(cfg: TrainConfig, meta: dict) -> tuple[dict, torch.nn.Module]:
        tok = json.loads((cfg.data_dir / "tokenizer.json").read_text())
        ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
        config = checkpoint.hf_config(cfg.shape, mask_id=ids["<|mask|>"], eos_id=ids["<|im_end|>"],
                                      eot_id=ids["<|endoftext|>"], pad_id=ids["<|endoftext|>"])
        assert meta["vocab_size"] <= cfg.shape.vocab_size
        model = checkpoint.build_model(config)
        if cfg.init_dir is None:
            init_weights(model, cfg.shape.num_layers)
        else:
            checkpoint.load_weights(model, cfg.init_dir)
        return config, model

    def _optimizer(self) -> torch.optim.Optimizer:
        trained = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        decay = [p for n, p in trained if p.dim() >= 2]
        other = [p for n, p in trained if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(0.9, 0.95), fused=fused)

    def _hidden_noisy(self, batch, backend) -> torch.Tensor:
        b, l = batch.clean.shape
        ids = torch.cat([batch.noisy, batch.clean], dim=1)  # [B, 2L]
        pos = torch.arange(l, device=ids.device).repeat(2).expand(b, 2 * l)
        # bf16 autocast on CPU too: its bf16 matmuls run ~2.8x the fp32 rate on AVX512-BF16 cores.
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            hidden = self.model(ids.reshape(-1), pos.reshape(-1), backend).view(b, 2 * l, -1)
            return self.model.logits(hidden[:, :l])

    def _loss(self, clean, noisy, masked, weight, noisable, mask) -> torch.Tensor:
        # Tensors, not the dataclass, so torch.compile guards stay simple.
        batch = NoisedBatch(clean, noisy, masked, weight, noisable)
        return weighted_loss(self._hidden_noisy(batch, TrainBackend(mask, clean.shape[0])), batch)

    def train(self) -> dict:
        """Steps until ``max_steps`` or ``train_seconds``; the clock (and the wall-clock LR
        schedule) starts after the first step, which carries torch.compile's build (106 s for a
        135M model on an H200: a short run's whole schedule would otherwise pass while compiling)."""
        cfg, start = self.cfg, time.perf_counter()
        step, elapsed, first_step = 0, 0.0, 0.0
        best = _Best()
        while step < cfg.max_steps and elapsed < cfg.train_seconds:
            for group in self.opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg, step, elapsed)
            rows = self.sampler.next()
            seg = (chunk_segments(len(rows), cfg.seq_len, self.block, cfg.chunk_mix, self.sampler.gen, self.device)
                   if cfg.chunk_mix > 0 else None)
            batch = noise(rows, self.mask_id, self.block, cfg.eps, self.sampler.gen, seg)
            loss = self.step_fn(batch.clean, batch.noisy, batch.masked, batch.weight, batch.noisable,
                                self.masks.make(seg))
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - start
            if step % cfg.log_every == 0 or step == 1:
                self._record(step, elapsed, loss, gnorm)
            if step == 1:
                first_step, start, elapsed = elapsed, time.perf_counter(), 0.0
            if cfg.val_every and step % cfg.val_every == 0:
                row = {"step": step, "seconds": round(elapsed, 2), "heldout_loss": self.heldout_loss(cfg.heldout)}
                self.log.append(row)
                print(json.dumps(row), flush=True)
                if cfg.keep_best:
                    best.offer(self.model, step, row["heldout_loss"])
        summary = {"steps": step, "seconds": elapsed, "first_step_seconds": first_step,
                   "tokens": step * cfg.batch_size * cfg.seq_len}
        if best.weights is not None:
            best.restore(self.model)
            summary.update(kept_step=best.step, kept_heldout_loss=best.loss)
        return summary

    def _record(self, step: int, elapsed: float, loss: torch.Tensor, gnorm: torch.Tensor) -> None:
        row = {"step": step, "seconds": round(elapsed, 2), "loss": float(loss.detach()), "grad_norm": float(gnorm),
               "lr": self.opt.param_groups[0]["lr"], "tokens": step * self.cfg.batch_size * self.cfg.seq_len}
        self.log.append(row)
        print(json.dumps(row), flush=True)

    @torch.no_grad()
    def heldout_loss(self, name: str | None = None, max_rows: int = 256) -> float:
        """Mean CE per masked token on held-out rows, fixed noise seed (comparable across runs)."""
        path = self.cfg.data_dir / f"{name or self.cfg.heldout}.bin.gz"
        if not path.exists():
            return float("nan")
        rows = torch.from_numpy(load_rows(path, self.cfg.seq_len)[:max_rows]).to(self.device)
        if len(rows) == 0:
            return float("nan")
        gen = torch.Generator(device=self.device).manual_seed(1234)
        total, count = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for chunk in rows.split(self.cfg.batch_size):
            batch = noise(chunk, self.mask_id, self.block, self.cfg.eps, gen)
            mask = DenseMasks(len(chunk), self.cfg.seq_len, self.block, self.device).static
            s, n = masked_ce(self._hidden_noisy(batch, TrainBackend(mask, len(chunk))), batch)
            total, count = total + s, count + n
        return float(total / count.clamp(min=1))

    def save(self, out_dir: Path, extra: dict) -> None:
        if self.cfg.conversion is not None:
            convert.save(self.cfg.conversion, self.hf_config, self.model, out_dir)
        else:
            state = checkpoint.bf16_state(self.model)
            checkpoint.write_hf_dir(out_dir, self.hf_config, state, self.cfg.data_dir, self.cfg.max_shard_bytes)
        log = {"config": {k: str(v) for k, v in asdict(self.cfg).items()}, "log": self.log, **extra}
        (out_dir / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
