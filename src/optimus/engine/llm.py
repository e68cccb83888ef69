"""Offline API: ``LLM(model, **config).generate(prompts, params)``."""

from __future__ import annotations

from typing import Sequence

from tqdm.auto import tqdm

from optimus.config import engine_config
from optimus.engine.engine import Engine
from optimus.core.outputs import RequestOutput
from optimus.core.params import SamplingParams


class LLM:
    """Batch generation over the continuous-batching engine.

    ``LLM("path/to/model", policy="fixed:8", num_pages=256)`` — keyword options are the
    leaf fields of :class:`optimus.config.EngineConfig`.
    """

    def __init__(self, model: str = "default", loaded=None, commit_rule=None, **options) -> None:
        self.engine = Engine(engine_config(model=model, **options), loaded=loaded, commit_rule=commit_rule)
        self.engine.post.stream_text = False  # text once, when a request finishes
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]] | str,
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        ids = []
        for p, sp in zip(prompts, params):
            prompt_ids = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
            rid = f"offline-{self._counter}"
            self._counter += 1
            self.engine.add_request(rid, prompt_ids, sp)
            ids.append(rid)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), disable=not use_tqdm, desc="generate")
        while len(results) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
                    bar.update(1)
            if not self.engine.has_work() and len(results) < len(ids):
                raise RuntimeError("engine went idle with requests unfinished")
        bar.close()
        return [results[i] for i in ids]

    def chat(self, messages_list: Sequence[list[dict]], params=None, **kw) -> list[RequestOutput]:
        prompts = [self.tokenizer.apply_chat_template(m, add_generation_prompt=True) for m in messages_list]
        return self.generate(prompts, params, **kw)
