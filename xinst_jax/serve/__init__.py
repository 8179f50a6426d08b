"""OpenAI-compatible HTTP serving over the inference engine (the `serve` job)."""
