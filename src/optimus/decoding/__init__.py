"""How a step turns logits into commits: proposals, commit rules, replayed acceptance."""
