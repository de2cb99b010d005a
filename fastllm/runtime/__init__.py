"""The inference engine: providers, sessions, KV cache, sampling and continuous batching."""
