"""Inference: a KV cache sharded over sp, exact LSE-merged decoding, sampling (docs/generation.md)."""

from ringformer.generate.api import Generator, Result, generate
from ringformer.generate.cache import CacheSpec, KVCache, make_spec
from ringformer.generate.decode import decode_step, place_params, prefill
from ringformer.generate.sampling import Sampling

__all__ = ["CacheSpec", "Generator", "KVCache", "Result", "Sampling", "decode_step", "generate",
           "make_spec", "place_params", "prefill"]
