"""Continuous-batching engine: requests, scheduler, paged KV cache, model runner, policies."""
