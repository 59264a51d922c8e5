"""Where each support volume is inserted into a query ("video" = query[:k] + support + query[k:])."""

from __future__ import annotations

import hashlib
import random


def insertion_positions(query: str, support: str, n_query: int, count: int = 5, seed: int = 42) -> list[int]:
    """`count` distinct positions in 0..n_query-1, as the reference samples them (without replacement).

    The reference draws all pairs from one generator seeded 42, so a pair's positions depend on every pair drawn
    before it; here each (query, support) pair seeds its own generator from `seed` and both names, so a resumed
    or sharded run gives exactly what one full run gives.
    """
    digest = hashlib.sha256(f"{seed}:{query}:{support}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return sorted(rng.sample(range(n_query), min(count, n_query)))
