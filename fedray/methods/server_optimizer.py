"""Server-side optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

The round's change of the global state, ``delta = averaged - before``, is a pseudo-gradient
(pointing downhill): plain FedAvg takes ``before + delta``; a server optimizer takes a
step built from it and its history instead.

- ``fedavgm`` (Hsu et al., 2019): ``m = momentum * m + delta``; ``x = x + lr * m``.
- ``fedadam``: ``m = b1 * m + (1 - b1) * delta``; ``v = b2 * v + (1 - b2) * delta^2``;
  ``x = x + lr * m / (sqrt(v) + tau)``.
- ``fedyogi``: as ``fedadam`` with ``v = v - (1 - b2) * delta^2 * sign(v - delta^2)``.

As in the paper's Algorithm 2, there is no bias correction and ``v`` starts at ``tau^2``.
What "the global state" is depends on the method (``Method.server_state``); the head, when
it trains, is part of it. The optimizer works on named float32 tensors of fixed shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

import torch
from torch import Tensor

#: ``fedavg`` is no server optimizer: the method's average is the new global state.
ServerRule = Literal["fedavg", "fedavgm", "fedadam", "fedyogi"]
SERVER_RULES: tuple[str, ...] = get_args(ServerRule)


class ServerOptimizer:
    """One of ``fedavgm``, ``fedadam``, ``fedyogi`` over a dict of named tensors."""

    def __init__(
        self,
        rule: ServerRule,
        *,
        lr: float = 1.0,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.99),
        tau: float = 1e-3,
    ) -> None:
        if rule not in SERVER_RULES or rule == "fedavg":
            raise ValueError(f"server optimizer must be one of {SERVER_RULES[1:]}, got {rule!r}")
        self.rule = rule
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.betas = (float(betas[0]), float(betas[1]))
        self.tau = float(tau)
        self.steps = 0
        self._m: dict[str, Tensor] = {}
        self._v: dict[str, Tensor] = {}

    def step(self, before: Mapping[str, Tensor], averaged: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The new global state, from the state ``before`` the round and the round's plain average."""
        if set(before) != set(averaged):
            raise ValueError(f"server step: the state's names changed ({sorted(before)} -> {sorted(averaged)})")
        new = {}
        for name, x in before.items():
            delta = averaged[name] - x
            new[name] = x + self.lr * self._direction(name, delta)
        self.steps += 1
        return new

    def state_dict(self) -> dict[str, Any]:
        """``{"tensors": ..., "meta": ...}`` (tensors only under "tensors"), for checkpoints."""
        tensors = {f"m.{name}": value for name, value in self._m.items()}
        tensors.update({f"v.{name}": value for name, value in self._v.items()})
        meta = {"rule": self.rule, "lr": self.lr, "momentum": self.momentum, "betas": list(self.betas)}
        return {"tensors": tensors, "meta": meta | {"tau": self.tau, "steps": self.steps}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        meta = state["meta"]
        mine = self.state_dict()["meta"]
        for key in ("rule", "lr", "momentum", "betas", "tau"):
            if meta[key] != mine[key]:
                raise ValueError(f"saved server optimizer has {key}={meta[key]!r}, this run has {mine[key]!r}")
        tensors = state["tensors"]
        self._m = {key[2:]: value.clone() for key, value in tensors.items() if key.startswith("m.")}
        self._v = {key[2:]: value.clone() for key, value in tensors.items() if key.startswith("v.")}
        self.steps = int(meta["steps"])

    def _direction(self, name: str, delta: Tensor) -> Tensor:
        if self.rule == "fedavgm":
            m = self._m.get(name)
            self._m[name] = delta.clone() if m is None else self.momentum * m + delta
            return self._m[name]
        b1, b2 = self.betas
        m = self._m.get(name, torch.zeros_like(delta))
        v = self._v.get(name, torch.full_like(delta, self.tau**2))
        m = b1 * m + (1 - b1) * delta
        square = delta * delta
        # Adam moves v toward delta^2 by a share of the gap; Yogi by at most (1 - b2) delta^2.
        gap = v - square
        v = v - (1 - b2) * (gap if self.rule == "fedadam" else square * torch.sign(gap))
        self._m[name], self._v[name] = m, v
        return m / (v.sqrt() + self.tau)
