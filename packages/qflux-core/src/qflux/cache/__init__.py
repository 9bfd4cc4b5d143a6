"""The embedding cache: content-addressed, verified ``EncodedSample`` entries in safetensors (DESIGN section 7)."""

from qflux.cache.keys import CacheContext, entry_key
from qflux.cache.store import EmbeddingCache

__all__ = ["CacheContext", "EmbeddingCache", "entry_key"]
