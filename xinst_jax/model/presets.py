"""Named model presets: architecture numbers of published checkpoints (HF config.json values)."""

PRESETS: dict[str, dict] = {
    # CPU tests and the demo.
    "tiny": dict(vocab_size=512, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 mlp_dim=176, rope_theta=10000.0, max_seq_len=512, tie_embeddings=False),
    # HuggingFaceTB/SmolLM2-135M(-Instruct): also the ~100M preset for CPU benchmarks.
    "smollm2_135m": dict(vocab_size=49152, embed_dim=576, num_layers=30, num_heads=9, num_kv_heads=3,
                         head_dim=64, mlp_dim=1536, rope_theta=100000.0, norm_eps=1e-5, max_seq_len=8192,
                         tie_embeddings=True, bos_token_id=1, eos_token_id=2),
    "llama2_7b": dict(vocab_size=32000, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                      head_dim=128, mlp_dim=11008, rope_theta=10000.0, norm_eps=1e-5, max_seq_len=4096,
                      tie_embeddings=False, bos_token_id=1, eos_token_id=2),
    "llama2_13b": dict(vocab_size=32000, embed_dim=5120, num_layers=40, num_heads=40, num_kv_heads=40,
                       head_dim=128, mlp_dim=13824, rope_theta=10000.0, norm_eps=1e-5, max_seq_len=4096,
                       tie_embeddings=False, bos_token_id=1, eos_token_id=2),
    "llama3_8b": dict(vocab_size=128256, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                      head_dim=128, mlp_dim=14336, rope_theta=500000.0, norm_eps=1e-5, max_seq_len=8192,
                      tie_embeddings=False, bos_token_id=128000, eos_token_id=128001),
}
