"""KVCache: static buffers written in place at the given positions, never part of a state dict."""

from __future__ import annotations

import torch

from pgconv.model.kv_cache import KVCache


def test_update_writes_at_positions_in_place_and_keeps_shape():
    cache = KVCache(batch=2, kv_heads=3, max_seq_len=10, head_dim=4, dtype=torch.float32)
    ptr = cache.k.data_ptr()
    k, v = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    k_all, v_all = cache.update(torch.tensor([4, 5]), k, v)
    assert k_all.shape == (2, 3, 10, 4) and k_all.data_ptr() == ptr  # no torch.cat growth, no reallocation
    assert torch.equal(k_all[:, :, 4:6], k) and torch.equal(v_all[:, :, 4:6], v)
    assert k_all[:, :, :4].abs().sum() == 0 and k_all[:, :, 6:].abs().sum() == 0
    cache.reset()
    assert cache.k.abs().sum() == 0 and cache.v.abs().sum() == 0


def test_cache_keeps_its_dtype_and_stays_out_of_the_state_dict():
    cache = KVCache(1, 1, 4, 2, dtype=torch.bfloat16)
    k = torch.randn(1, 1, 1, 2)
    k_all, _ = cache.update(torch.tensor([0]), k, k)
    assert k_all.dtype == torch.bfloat16 and torch.equal(k_all[:, :, 0], k[:, :, 0].bfloat16())
    assert cache.state_dict() == {} and cache.max_seq_len == 4
