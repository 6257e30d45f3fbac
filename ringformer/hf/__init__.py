"""Hugging Face LLaMA directories: the name-by-name mapping (`mapping`) and run conversion (`convert`)."""

from typing import Any

__all__ = ["config_from_hf", "config_to_hf", "load_llama", "read_config", "save_llama"]


def __getattr__(name: str) -> Any:
    # Lazy, so that the jax-free submodules (hf_config, convert) can be imported by config
    # files before jax starts; `from ringformer.hf import load_llama` still works.
    if name in __all__:
        from ringformer.hf import mapping
        return getattr(mapping, name)
    raise AttributeError(f"module 'ringformer.hf' has no attribute {name!r}")
