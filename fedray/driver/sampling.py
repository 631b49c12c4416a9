"""Which clients a round samples and the seed each trains with: seeded per round, so a
resumed run (or a benchmark that replays fedray's rounds) agrees with the original."""

from __future__ import annotations

import numpy as np

from fedray.config import Spec


def client_seed(spec: Spec, round_index: int, client_id: int) -> int:
    """A seed for one client's round, independent of scheduling order."""
    return int(np.random.SeedSequence([spec.seed, round_index, client_id]).generate_state(1)[0])


def sample_clients(spec: Spec, round_index: int, attempt: int = 0) -> list[int]:
    """The clients of round ``round_index`` (seeded per round and attempt, so a resumed run agrees)."""
    rng = np.random.default_rng([spec.seed, round_index, attempt])
    return sorted(int(c) for c in rng.choice(spec.num_clients, size=spec.sampled_clients, replace=False))
