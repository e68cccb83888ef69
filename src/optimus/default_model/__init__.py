"""The shipped default model: a ~22M-parameter SDAR-style block-diffusion LM (block 32) trained
by ``python -m optimus_lab.train`` (see docs/default_model.md). Its HF directory is this package's
folder: config.json, model.safetensors (bf16), tokenizer files, generation_config.json and
CHECKSUM (sha256 of model.safetensors)."""

from __future__ import annotations

from pathlib import Path

WEIGHTS = "model.safetensors"


def default_model_dir() -> Path:
    """The directory the loader reads for ``--model default``."""
    return Path(__file__).resolve().parent


def recorded_checksum() -> str:
    """The sha256 of the shipped weights, as recorded when the checkpoint was committed."""
    return (default_model_dir() / "CHECKSUM").read_text().split()[0]
