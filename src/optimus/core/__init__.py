"""Types every part shares: sampling parameters, requests, step plans, outputs."""
