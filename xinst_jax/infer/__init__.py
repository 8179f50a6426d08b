"""Inference: batched KV-cache generation, log-likelihood scoring and the `generate` job."""
