"""Named FastGPT sizes: a table of configuration values, read by `FastGPTConfig.from_preset`.

Each entry lists only what differs from `FastGPTConfig`'s defaults. The `1b` and `13b` shapes copy
Llama-3.2-1B and Llama-2-13B (hidden size, depth, heads, vocabulary), so that FastGPT and its Llama peer
can be compared weight for weight; their attention layout is FastGPT's three-stage default.
"""

PRESETS: dict[str, dict] = {
    # For unit tests: one layer of each kind, windows and blocks small enough that short inputs cross them.
    "tiny": {
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "sliding_window": 8,
        "dynamic_window": 16,
        "num_memory_tokens": 2,
        "compress_block_size": 4,
    },
    # 27.3M parameters with a 16K vocabulary (`fastgpt info --preset small`); the demo trains it cut to width 128.
    "small": {
        "vocab_size": 16384,
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "sliding_window": 128,
        "dynamic_window": 256,
        "num_memory_tokens": 8,
        "compress_block_size": 32,
        "tie_word_embeddings": True,
    },
    "125m": {
        "vocab_size": 32000,
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "tie_word_embeddings": True,
    },
    # Llama-3.2-1B's shape.
    "1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "tie_word_embeddings": True,
    },
    # Llama-2-13B's shape: the whitepaper's FastGPT-13B.
    "13b": {
        "vocab_size": 32000,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "head_dim": 128,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
    },
}
