"""Hugging Face LLaMA directories: the name-by-name mapping (`mapping`) and run conversion (`convert`)."""

from ringformer.hf.mapping import config_from_hf, config_to_hf, load_llama, read_config, save_llama

__all__ = ["config_from_hf", "config_to_hf", "load_llama", "read_config", "save_llama"]
