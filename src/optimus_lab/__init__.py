"""Training and evaluation of the shipped default model; not part of the serving import path."""
