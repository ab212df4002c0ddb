"""Small reference models built on :mod:`jax_nf4.flax` (needs ``flax``)."""

from jax_nf4.models.llama import (CONFIGS, KVCache, Llama, LlamaConfig, ShardedLlama,
                                  benchmark_decode, compare_decode, dequantized_copy,
                                  from_checkpoint, generate, get_config, hf_config,
                                  peak_device_bytes, shard_config, shard_model)

__all__ = ["CONFIGS", "KVCache", "Llama", "LlamaConfig", "ShardedLlama", "benchmark_decode",
           "compare_decode", "dequantized_copy", "from_checkpoint", "generate", "get_config",
           "hf_config", "peak_device_bytes", "shard_config", "shard_model"]
