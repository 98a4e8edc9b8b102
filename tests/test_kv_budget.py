"""The KV-cache budget on a GPU, with a fake caching-allocator state (no GPU needed).

After a training step torch's caching allocator keeps the step's peak reserved: the driver reports
little free memory although most of the reservation is unused. The budget must empty the cache first
and then count driver-free memory plus what the allocator still holds reserved but unallocated.
"""
import torch

from megagsm.generation import kv_cache

GIB = 1024**3


class FakeAllocator:
    """16 GiB device; 4 GiB allocated; the allocator holds 10 GiB reserved, of which empty_cache can
    hand 5 GiB back (1 GiB stays: segments shared with live blocks)."""

    def __init__(self):
        self.total, self.allocated, self.reserved, self.calls = 16 * GIB, 4 * GIB, 10 * GIB, []

    def empty_cache(self):
        self.calls.append("empty_cache")
        self.reserved = 5 * GIB

    def mem_get_info(self, device=None):
        self.calls.append("mem_get_info")
        return self.total - self.reserved, self.total

    def memory_reserved(self, device=None):
        return self.reserved

    def memory_allocated(self, device=None):
        return self.allocated


def _install(monkeypatch):
    fake = FakeAllocator()
    for name in ("empty_cache", "mem_get_info", "memory_reserved", "memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    return fake


def test_budget_empties_the_cache_then_counts_reserved_but_free(monkeypatch):
    fake = _install(monkeypatch)
    free, source = kv_cache.free_memory_bytes(torch.device("cuda", 0))
    # by hand: after empty_cache the driver has 16 - 5 = 11 GiB free, the allocator 5 - 4 = 1 GiB unused
    assert free == 12 * GIB
    assert fake.calls[0] == "empty_cache" and "mem_get_info" in fake.calls
    assert "reserved but unused" in source and "empty_cache" in source


def test_a_cache_that_fits_only_with_the_reserved_memory_is_accepted(monkeypatch):
    from megagsm.generation.kv_cache import CacheShape

    _install(monkeypatch)
    # 10.5 GiB of cache (21 x 64 x 2048 x 8 x 256 x 2 B): more than 0.9 x 11 GiB driver-free, less than 0.9 x 12 GiB
    shape = CacheShape(layers=21, kv_groups=8, key_dim=128, value_dim=128, bytes_per_elem=2)
    batch, seq = 64, 2048
    need = shape.bytes(batch, seq)
    assert 0.9 * 11 * GIB < need < 0.9 * 12 * GIB
    monkeypatch.setattr(kv_cache, "cache_shape", lambda model, dtype: shape)
    assert kv_cache.check_fits(None, batch, seq, torch.bfloat16, torch.device("cuda", 0)) is None
