"""The warm-up barrier's actor, in a module of its own: an actor's process imports the
module that defines it, and this one needs only Ray (the harness pulls in torch and fedray,
seconds of imports per actor)."""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class StartLine:
    """Counts the warm-up tasks that have started, so that each can wait for all of them."""

    def __init__(self) -> None:
        self.started = 0

    def arrive(self) -> None:
        self.started += 1

    def count(self) -> int:
        return self.started
