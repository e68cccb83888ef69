"""Policy names to policies: ``ar``, ``fixed:C``, ``elastic``."""

from __future__ import annotations

from optimus.core.params import parse_policy_name
from optimus.policy.base import ChunkPolicy


def make_policy(name: str, **kwargs) -> ChunkPolicy:
    """``kwargs`` go to :class:`ElasticPolicy` (profile, tau_prior, ...); fixed policies take none."""
    kind, c = parse_policy_name(name)
    if kind == "elastic":
        from optimus.policy.elastic.controller import ElasticPolicy
        return ElasticPolicy(**kwargs)
    if kwargs:
        raise TypeError(f"policy {name!r} takes no options, got {sorted(kwargs)}")
    from optimus.policy.fixed import FixedPolicy
    return FixedPolicy(c, name=name)
