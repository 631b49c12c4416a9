"""Server optimizers: each step against a hand computation on fixed pseudo-gradients, their
state across a checkpoint, and every method's global state as they step it."""

from __future__ import annotations

import math
import re

import pytest
import torch

from fedray.config import SpecError, load_spec
from fedray.methods import ClientUpdate, create_method
from fedray.methods.server_optimizer import ServerOptimizer
from tests.test_methods import perturbed

BUILTIN = ["fedit", "flora", "flexlora", "hetlora", "hlora", "fedplora"]
SHAPES = {"q": (12, 10), "v": (12, 8)}
#: Two rounds' pseudo-gradients of a two-entry parameter, starting from x = [1, -2].
START = [1.0, -2.0]
DELTAS = [[0.5, -0.1], [-0.2, 0.3]]


def _steps(optimizer: ServerOptimizer) -> list[list[float]]:
    """Run the two rounds; return x after each."""
    x = torch.tensor(START, dtype=torch.float64)
    seen = []
    for delta in DELTAS:
        x = optimizer.step({"w": x}, {"w": x + torch.tensor(delta, dtype=torch.float64)})["w"]
        seen.append(x.tolist())
    return seen


def _hand(rule: str, lr: float, momentum=0.9, b1=0.9, b2=0.99, tau=1e-3) -> list[list[float]]:
    """The same two rounds, one scalar at a time, as the papers write them."""
    out = [[], []]
    for i, x in enumerate(START):
        m, v = 0.0, tau**2
        for t, delta in enumerate(d[i] for d in DELTAS):
            if rule == "fedavgm":
                m = momentum * m + delta
                x = x + lr * m
            else:
                m = b1 * m + (1 - b1) * delta
                if rule == "fedadam":
                    v = b2 * v + (1 - b2) * delta**2
                else:
                    v = v - (1 - b2) * delta**2 * math.copysign(1.0, v - delta**2)
                x = x + lr * m / (math.sqrt(v) + tau)
            out[t].append(x)
    return out


@pytest.mark.parametrize("rule", ["fedavgm", "fedadam", "fedyogi"])
def test_each_rule_steps_as_the_hand_computation(rule):
    optimizer = ServerOptimizer(rule, lr=0.1, momentum=0.9, betas=(0.9, 0.99), tau=1e-3)
    for got, want in zip(_steps(optimizer), _hand(rule, lr=0.1), strict=True):
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_yogi_and_adam_part_where_delta_squared_outgrows_v():
    adam = _steps(ServerOptimizer("fedadam", lr=0.1))
    yogi = _steps(ServerOptimizer("fedyogi", lr=0.1))
    assert adam[0] != yogi[0]  # v = tau^2 < delta^2: Adam adds (1 - b2) of the gap, Yogi (1 - b2) delta^2


def test_fedavgm_without_momentum_at_lr_one_is_fedavg():
    x = torch.tensor(START)
    averaged = x + torch.tensor(DELTAS[0])
    step = ServerOptimizer("fedavgm", lr=1.0, momentum=0.0).step({"w": x}, {"w": averaged})["w"]
    assert torch.equal(step, averaged)


def test_state_survives_a_checkpoint_exactly():
    whole = ServerOptimizer("fedadam", lr=0.05)
    first = ServerOptimizer("fedadam", lr=0.05)
    x = {"w": torch.tensor(START)}
    x = first.step(x, {"w": x["w"] + torch.tensor(DELTAS[0])})
    resumed = ServerOptimizer("fedadam", lr=0.05)
    resumed.load_state_dict(first.state_dict())
    after_resume = resumed.step(x, {"w": x["w"] + torch.tensor(DELTAS[1])})["w"]
    y = {"w": torch.tensor(START)}
    y = whole.step(y, {"w": y["w"] + torch.tensor(DELTAS[0])})
    assert torch.equal(after_resume, whole.step(y, {"w": y["w"] + torch.tensor(DELTAS[1])})["w"])
    assert resumed.steps == 2
    with pytest.raises(ValueError, match=re.escape("lr=0.05")):
        ServerOptimizer("fedadam", lr=0.1).load_state_dict(first.state_dict())


@pytest.mark.parametrize("name", BUILTIN)
def test_every_method_takes_back_its_server_state(name):
    method = create_method(name, SHAPES, 6, scale=2.0, seed=1)
    noise = torch.Generator().manual_seed(0)
    updates = []
    for client, rank in enumerate([6, 6] if name == "fedit" else [2, 6]):
        B, A = perturbed(method.client_init(client, rank), noise, amount=0.2)
        updates.append(ClientUpdate(client, rank, 5, B, A))
    method.aggregate(updates)
    before = {k: v.clone() for k, v in method.global_delta().items()}
    state = method.server_state()
    assert all(t.dtype == torch.float32 for t in state.values())
    method.load_server_state(state)
    for layer, delta in method.global_delta().items():
        assert torch.allclose(delta, before[layer], atol=1e-5)
    # A step of the state is a step of the global model: doubling it doubles the delta
    # for the dense states (FLoRA, FlexLoRA, HLoRA), and scales B for the factor states.
    method.load_server_state({k: 2 * v for k, v in state.items()})
    factor = 4.0 if name in ("fedit", "hetlora", "fedplora") else 2.0  # B and A both doubled
    for layer, delta in method.global_delta().items():
        assert torch.allclose(delta, factor * before[layer], atol=1e-4)


def test_server_options_are_checked_with_a_clear_error():
    spec = load_spec(None, ["server.optimizer=fedyogi", "server.lr=0.01", "server.tau=1e-2"])
    assert spec.server.create().rule == "fedyogi"
    assert load_spec(None).server.create() is None
    with pytest.raises(SpecError, match=re.escape("server.momentum applies to server.optimizer in ['fedavgm']")):
        load_spec(None, ["server.optimizer=fedadam", "server.momentum=0.5"])
    with pytest.raises(SpecError, match=re.escape("server.optimizer")):
        load_spec(None, ["server.optimizer=adam"])
    with pytest.raises(SpecError, match=re.escape("each must be in [0, 1)")):
        load_spec(None, ["server.optimizer=fedadam", "server.betas=[0.9, 1.0]"])
