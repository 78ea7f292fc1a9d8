"""Shared test set-up: every test starts from the same seed and default dtype (litgpt/torchtune style)."""

from __future__ import annotations

import os

import pytest
import torch

# torch's own kernel picks unless a run asks otherwise (PGCONV_KERNELS=auto measures, as users get): the suite stays
# deterministic and never writes kernel decisions into the user's cache. tests/test_cpu_kernels.py covers every
# kernel and the measuring itself.
os.environ.setdefault("PGCONV_KERNELS", "default")
# Likewise the conversion write path: O_DIRECT (no probe writes in every test's filesystem; tests/test_writer.py and
# tests/test_write_path.py cover each mode and the measuring).
os.environ.setdefault("PGCONV_WRITER", "direct")


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
