"""The device side of a step: batch building, the forward (CUDA graphs or eager), the paged KV storage."""
