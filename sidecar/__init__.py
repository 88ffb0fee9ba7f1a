"""Identity-aware authorization and spend-limit sidecar for LLM traffic."""

__version__ = "0.1.0"
