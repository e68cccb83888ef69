"""Tensor parallelism inside one engine: a model sharded over ``--tensor-parallel`` processes.

Rank 0 is the engine (scheduler, runner, postprocessing); ranks 1.. are workers that hold
their shard and its KV pages and replay every model call rank 0 makes (``commands.py``).
``sharding.py`` says which slice of each tensor a rank holds, ``group.py`` wraps the
``torch.distributed`` groups, ``head.py`` is the vocabulary-parallel LM head, ``sampling.py``
its sampled draw, and ``launch.py`` starts the workers. See docs/parallel.md.
"""
