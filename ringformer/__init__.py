"""ringformer: exact Ring Attention with Blockwise Transformers for long-context LLaMA training."""

__version__ = "0.1.0"
