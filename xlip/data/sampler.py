"""The mixed-kind batch sampler: every batch holds a fixed number of rows of each source."""

from __future__ import annotations

import random
from typing import Iterator, Sequence

from torch.utils.data import Sampler

from xlip.hashing import hash_int


class MixedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches with a fixed number of rows from each source, by weight (largest remainder).

    Pure function of (seed, step): the k-th draw from source s is row ``perm_{s,e}[k mod n_s]``
    with epoch e = k // n_s, so resuming needs only the step. DDP-aware: every rank's batch has
    the same composition (``quotas(weights, batch_size)`` rows per source), so the contrastive
    rows that ranks gather have equal counts; rank r of w takes draws
    ``[(step·w + r)·q_s, (step·w + r + 1)·q_s)`` of source s, and the w ranks together draw
    exactly the rows of a one-process batch of w·batch_size when the quotas scale (e.g. equal
    weights).
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], batch_size: int,
                 seed: int = 0, start_step: int = 0, steps: int | None = None,
                 rank: int = 0, world_size: int = 1) -> None:
        self.sizes, self.seed = list(sizes), seed
        self.batch_size, self.rank, self.world = batch_size, rank, world_size
        self.start_step, self.steps = start_step, steps
        self.quota = quotas(weights, batch_size)
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self._perm: dict[tuple[int, int], list[int]] = {}

    def perm(self, s: int, epoch: int) -> list[int]:
        key = (s, epoch)
        if key not in self._perm:
            if len(self._perm) > 4 * len(self.sizes):
                self._perm.clear()
            p = list(range(self.sizes[s]))
            random.Random(hash_int(f"{self.seed}/{s}/{epoch}")).shuffle(p)
            self._perm[key] = p
        return self._perm[key]

    def rank_batch(self, step: int, rank: int) -> list[tuple[int, int]]:
        """(dataset index, per-draw seed) of ``rank``'s rows at ``step``."""
        out = []
        for s, q in enumerate(self.quota):
            n = self.sizes[s]
            first = (step * self.world + rank) * q
            for k in range(first, first + q):
                row = self.perm(s, k // n)[k % n]
                out.append((self.offsets[s] + row, hash_int(f"{self.seed}/{s}/{k}")))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.steps is None or step < self.steps:
            yield self.rank_batch(step, self.rank)
            step += 1

    def __len__(self) -> int:
        return (self.steps or 0) - self.start_step


def quotas(weights: Sequence[float], total: int) -> list[int]:
    """Split ``total`` by ``weights`` with the largest-remainder method (each ≥ 1 if possible)."""
    w = [x / sum(weights) for x in weights]
    raw = [x * total for x in w]
    q = [int(r) for r in raw]
    for i in sorted(range(len(w)), key=lambda i: raw[i] - q[i], reverse=True)[:total - sum(q)]:
        q[i] += 1
    for i in range(len(q)):  # every source appears in each batch
        if q[i] == 0 and total >= len(q):
            j = max(range(len(q)), key=lambda j: q[j])
            q[i], q[j] = 1, q[j] - 1
    return q
