"""The evaluation layer: the inference copy of a model, batched logits, top-1/top-5/per-class/confusion, the one
test-set builder, and the paper's multi-scale protocols."""
