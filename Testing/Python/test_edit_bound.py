"""bench/edit_bound.py's count of arithmetic: the basis of the README's bound on an exact edit's speed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parents[2] / "bench" / "edit_bound.py"


def _bench():
    spec = importlib.util.spec_from_file_location("edit_bound", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_counts_products_convolutions_and_fused_attention():
    bench = _bench()
    a, b = torch.randn(64, 32), torch.randn(32, 48)
    weight, image = torch.randn(8, 3, 3, 3), torch.randn(1, 3, 10, 10)
    q, k = torch.randn(2, 1, 16, 32), torch.randn(2, 1, 40, 32)

    def run(v):
        a @ b
        F.conv2d(image, weight)
        F.scaled_dot_product_attention(q, k, v)

    products = 2 * 64 * 32 * 48
    convolution = 2 * (8 * 8 * 8) * (3 * 3 * 3)  # outputs x multiply-adds per output
    fused = 2 * (2 * 16) * 40 * (32 + 32)  # scores, then weighted values: one operator the profiler leaves uncounted
    assert abs(bench.counted_gflop(lambda: run(torch.randn(2, 1, 40, 32))) * 1e9 - (products + convolution + fused)) < 1
    # values narrower than keys: torch's fallback runs counted products (and two scalings); none counted twice
    fallback = 2 * (2 * 16) * 40 * (32 + 8) + 2 * 16 * 32 + 2 * 32 * 40
    assert abs(bench.counted_gflop(lambda: run(torch.randn(2, 1, 40, 8))) * 1e9
               - (products + convolution + fallback)) < 1


def test_peak_is_a_rate():
    assert _bench().peak_gflops(size=256, runs=2) > 0
