"""Client faults injected on purpose (spec ``faults``), seeded per client, round and try."""

from __future__ import annotations

import os
import time

import numpy as np

from fedray.config import FaultSpec


class InjectedFault(RuntimeError):
    """A client failure injected on purpose (spec ``faults``)."""


def fault_seed(client_seed: int, attempt: int) -> int:
    """The seed of a client task's fault draw (its round's client seed and its try)."""
    return int(np.random.SeedSequence([client_seed, attempt]).generate_state(1)[0])


def inject_fault(faults: FaultSpec, seed: int) -> bool:
    """Maybe fail the way ``faults`` asks, decided by ``seed`` (a client's round and try).

    Returns whether the client should corrupt its update; the other faults act here.
    """
    draw = float(np.random.default_rng(seed).random())
    if draw < faults.raise_prob:
        raise InjectedFault(f"injected client failure (draw {draw:.3f} < raise_prob {faults.raise_prob})")
    draw -= faults.raise_prob
    if draw < faults.kill_prob:
        os._exit(1)  # the worker process dies, as on a lost node or an OOM kill
    draw -= faults.kill_prob
    if draw < faults.delay_prob:
        time.sleep(faults.delay_s)
        return False
    draw -= faults.delay_prob
    return draw < faults.corrupt_prob


def corrupt(update) -> None:
    """Make ``update`` a bad one (NaN factors), as a faulty client would send."""
    for factor in update.B.values():
        factor.fill_(float("nan"))
