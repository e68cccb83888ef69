"""Held-out text loss of a loaded model under the training objective (fixed noise seed)."""

from __future__ import annotations

from pathlib import Path

import torch

from optimus_lab.train.attention import DenseMasks, TrainBackend
from optimus_lab.train.objective import masked_ce, noise
from optimus_lab.train.pack import load_rows


@torch.no_grad()
def heldout_text_loss(loaded, rows_path: Path, max_rows: int = 32, batch: int = 8, seed: int = 1234) -> float:
    """Mean cross entropy (nats) per masked token over packed held-out rows."""
    spec, model = loaded.spec, loaded.model
    seq_len = min(spec.arch.max_position, 512)
    rows = torch.from_numpy(load_rows(rows_path, seq_len)[:max_rows])
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for chunk in rows.split(batch):
        b = noise(chunk, spec.mask_id, spec.block_size, 1e-3, gen)
        ids = torch.cat([b.noisy, b.clean], 1).to(device)
        pos = torch.arange(seq_len, device=device).repeat(2).expand(len(chunk), -1)
        mask = DenseMasks(len(chunk), seq_len, spec.block_size, device).static
        hidden = model(ids.reshape(-1), pos.reshape(-1), TrainBackend(mask, len(chunk)))
        logits = model.logits(hidden.view(len(chunk), 2 * seq_len, -1)[:, :seq_len]).cpu()
        s, n = masked_ce(logits, b)
        total, count = total + float(s), count + int(n)
    return total / max(count, 1)
