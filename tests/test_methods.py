"""The six methods against independent dense computations of shared/METHODS.md."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedray.methods import METHODS, NO_HOOK, ClientUpdate, create_method, load_state, save_state

SHAPES = {"q": (12, 10), "v": (8, 10)}
SCALE = 2.0
HETEROGENEOUS = ["flora", "flexlora", "hetlora", "hlora", "fedplora"]


def perturbed(init, generator: torch.Generator, amount: float = 0.3):
    """A client's "training": its start plus seeded noise."""

    def bump(factors):
        return {layer: t + amount * torch.randn(t.shape, generator=generator) for layer, t in factors.items()}

    return bump(init.B), bump(init.A)


def play_round(method, ranks, examples, generator):
    """One round with random training; returns (global before, inits, updates)."""
    before = {layer: t.double() for layer, t in method.global_delta().items()}
    inits, updates = [], []
    for client, (rank, n) in enumerate(zip(ranks, examples, strict=True)):
        init = method.client_init(client, rank)
        B, A = perturbed(init, generator)
        inits.append(init)
        updates.append(ClientUpdate(client, rank, n, B, A))
    return before, inits, updates


def end_delta(init, update, layer):
    """What a client's model adds to W0 after training (its fold plus its trained LoRA)."""
    delta = SCALE * update.B[layer].double() @ update.A[layer].double()
    if layer in init.fold:
        delta = delta + init.fold_delta()[layer].double()
    return delta


def frobenius(deltas: dict) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in deltas.values()))


def ranks_for(name: str, num_clients: int, max_rank: int, seed: int = 0) -> list[int]:
    if name == "fedit":
        return [max_rank] * num_clients
    generator = torch.Generator().manual_seed(seed)
    return [int(r) for r in torch.randint(1, max_rank + 1, (num_clients,), generator=generator)]


def expected_global(
    name,
    shapes,
    method,
    method_state_before,
    before,
    updates,
    layer,
    modules=None,
    weighting="norm",
    weighted=False,
):
    """The new global delta of ``layer`` straight from the formulas of METHODS.md."""
    total = sum(u.num_examples for u in updates)
    p = [u.num_examples / total for u in updates]
    d, k = shapes[layer]
    R = method.max_rank
    B = [u.B[layer].double() for u in updates]
    A = [u.A[layer].double() for u in updates]
    if name == "fedit":
        return SCALE * sum(pi * b for pi, b in zip(p, B)) @ sum(pi * a for pi, a in zip(p, A))
    if name in ("flexlora", "hlora"):
        return SCALE * sum(pi * b @ a for pi, b, a in zip(p, B, A))
    if name == "flora":
        return before[layer] + SCALE * sum(pi * b @ a for pi, b, a in zip(p, B, A))
    if name == "hetlora":
        if weighting == "norm":
            w = [float(torch.linalg.matrix_norm(SCALE * b @ a)) for b, a in zip(B, A)]
        else:
            w = [float(u.num_examples) for u in updates]
        pad_B = [torch.cat([b, torch.zeros(d, R - b.shape[1], dtype=b.dtype)], 1) for b in B]
        pad_A = [torch.cat([a, torch.zeros(R - a.shape[0], k, dtype=a.dtype)], 0) for a in A]
        mean_B = sum(wi * b for wi, b in zip(w, pad_B)) / sum(w)
        mean_A = sum(wi * a for wi, a in zip(w, pad_A)) / sum(w)
        return SCALE * mean_B @ mean_A
    assert name == "fedplora"
    # Module j's global value: the (weighted) mean over the clients that trained it, else
    # its old value (read from the saved state before the round).
    old_B = method_state_before["tensors"][f"global.{layer}.B"].double()
    old_A = method_state_before["tensors"][f"global.{layer}.A"].double()
    delta = torch.zeros(d, k, dtype=torch.float64)
    for j in range(R):
        pairs = []
        for chosen, update, pi in zip(modules, updates, p):
            picked = chosen[layer].tolist()
            if j in picked:
                column = picked.index(j)
                weight = pi if weighted else 1.0
                pairs.append((weight, update.B[layer][:, column].double(), update.A[layer][column].double()))
        if pairs:
            total_weight = sum(w for w, _, _ in pairs)
            b = sum(w * b for w, b, _ in pairs) / total_weight
            a = sum(w * a for w, _, a in pairs) / total_weight
        else:
            b, a = old_B[:, j], old_A[j]
        delta += SCALE * torch.outer(b, a)
    return delta


# ------------------------------------------------------------------ identities


def test_plora_equals_lora():
    method = create_method("fedplora", SHAPES, 6, scale=SCALE, seed=3)
    generator = torch.Generator().manual_seed(0)
    method.aggregate(play_round(method, [2, 6, 3], [5, 5, 5], generator)[2])
    for layer in SHAPES:
        fold = create_method("fedplora", SHAPES, 6, scale=SCALE, seed=3)
        fold.load_state_dict(method.state_dict())
        init = fold.client_init("probe", 6)  # every module, no fold: the raw B and A
        B, A = init.B[layer].double(), init.A[layer].double()
        rank_one_sum = sum(torch.outer(B[:, j], A[j]) for j in range(6))
        torch.testing.assert_close(rank_one_sum, B @ A)
        torch.testing.assert_close(SCALE * rank_one_sum, method.global_delta()[layer].double(), rtol=1e-5, atol=1e-6)


def test_flora_stacking_is_exact():
    method = create_method("flora", SHAPES, 4, scale=SCALE, seed=0)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        before, inits, updates = play_round(method, [1, 3, 4], [3, 5, 9], generator)
        stats = method.aggregate(iter(updates))
        total = sum(u.num_examples for u in updates)
        for layer in SHAPES:
            stacked_B = torch.cat([u.B[layer].double() for u in updates], dim=1)
            stacked_A = torch.cat([u.num_examples / total * u.A[layer].double() for u in updates], dim=0)
            direct = sum(u.num_examples / total * u.B[layer].double() @ u.A[layer].double() for u in updates)
            torch.testing.assert_close(stacked_B @ stacked_A, direct)
            torch.testing.assert_close(
                method.global_delta()[layer].double(), before[layer] + SCALE * direct, rtol=1e-5, atol=1e-6
            )
        assert stats.agg_noise == 0.0
        # Every client starts from the whole global delta, folded: no init noise.
        for init in inits:
            for layer, delta in init.effective_delta().items():
                torch.testing.assert_close(delta.double(), before[layer], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["flexlora", "hlora"])
def test_redistribution_error_is_the_dropped_singular_values(name):
    method = create_method(name, SHAPES, 4, scale=SCALE, seed=0)
    generator = torch.Generator().manual_seed(2)
    play = play_round(method, [4, 2, 3], [4, 7, 1], generator)
    method.aggregate(play[2])
    global_delta = {layer: t.double() for layer, t in method.global_delta().items()}
    noises, inits = [], []
    for client, rank in enumerate([1, 2, 4]):
        init = method.client_init(client, rank)
        squared = 0.0
        for layer, delta in init.effective_delta().items():
            singular = torch.linalg.svdvals(global_delta[layer])
            dropped = float(singular[rank:].square().sum())
            gap = float((global_delta[layer] - delta.double()).square().sum())
            assert gap == pytest.approx(dropped, rel=1e-4, abs=1e-9)
            squared += dropped
            U, S, Vh = torch.linalg.svd(global_delta[layer] / SCALE)
            B, A = init.B[layer].double(), init.A[layer].double()
            torch.testing.assert_close(B @ A, (U[:, :rank] * S[:rank]) @ Vh[:rank], rtol=1e-4, atol=1e-5)
            if name == "hlora":  # B = U_r (orthonormal columns), A = S_r V_r^T
                torch.testing.assert_close(B.T @ B, torch.eye(rank, dtype=B.dtype), atol=1e-5, rtol=0)
            else:  # balanced split: B^T B = A A^T = S_r
                torch.testing.assert_close(B.T @ B, A @ A.T, atol=1e-4, rtol=1e-4)
        noises.append(math.sqrt(squared))
        inits.append(init)
    stats = method.aggregate(ClientUpdate(c, i.rank, 1, i.B, i.A) for c, i in enumerate(inits))
    assert stats.init_noise == pytest.approx(sum(noises) / len(noises), rel=1e-4)


@pytest.mark.parametrize("rank", [1, 3, 5, 8])
def test_fedplora_client_starts_from_the_global_model(rank):
    method = create_method("fedplora", SHAPES, 8, scale=SCALE, seed=5)
    generator = torch.Generator().manual_seed(3)
    method.aggregate(play_round(method, [8, 4, 2], [2, 2, 2], generator)[2])
    global_delta = method.global_delta()
    init = method.client_init("c", rank)
    for layer, delta in init.effective_delta().items():
        torch.testing.assert_close(delta, global_delta[layer], rtol=1e-5, atol=1e-6)
        assert method.modules_of("c")[layer].numel() == rank
        assert len(set(method.modules_of("c")[layer].tolist())) == rank


@pytest.mark.parametrize("name", sorted(METHODS))
def test_identical_clients_aggregate_to_that_client(name):
    rank = 4 if name in ("fedit", "fedplora") else 3
    method = create_method(name, SHAPES, 4, scale=SCALE, seed=0)
    generator = torch.Generator().manual_seed(4)
    method.aggregate(play_round(method, ranks_for(name, 3, 4), [3, 3, 3], generator)[2])
    inits = [method.client_init(c, rank) for c in range(4)]
    B, A = perturbed(inits[0], generator)
    method.aggregate(ClientUpdate(c, rank, n, B, A) for c, n in enumerate([1, 5, 2, 9]))
    update = ClientUpdate(0, rank, 1, B, A)
    for layer, delta in method.global_delta().items():
        torch.testing.assert_close(delta.double(), end_delta(inits[0], update, layer), rtol=1e-5, atol=1e-5)
    assert method.last_round.agg_noise == pytest.approx(0.0, abs=1e-5)


# ------------------------------------------------------- every method, any shape


@st.composite
def settings_of_a_run(draw):
    layers = draw(st.integers(1, 2))
    shapes = {f"layer{i}": (draw(st.integers(2, 9)), draw(st.integers(2, 9))) for i in range(layers)}
    max_rank = draw(st.integers(1, min(min(s) for s in shapes.values())))
    num_clients = draw(st.integers(1, 4))
    examples = draw(st.lists(st.integers(1, 50), min_size=num_clients, max_size=num_clients))
    seed = draw(st.integers(0, 2**16))
    return shapes, max_rank, examples, seed


@pytest.mark.parametrize(
    "name, options",
    [
        ("fedit", {}),
        ("flora", {}),
        ("flexlora", {}),
        ("hlora", {}),
        ("hetlora", {"weighting": "norm"}),
        ("hetlora", {"weighting": "data"}),
        ("fedplora", {"weighted": False}),
        ("fedplora", {"weighted": True}),
    ],
)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(run=settings_of_a_run())
def test_round_matches_the_formulas(name, options, run):
    shapes, max_rank, examples, seed = run
    method = create_method(name, shapes, max_rank, scale=SCALE, seed=seed, **options)
    generator = torch.Generator().manual_seed(seed)
    for round_index in range(2):
        ranks = ranks_for(name, len(examples), max_rank, seed + round_index)
        state_before = method.state_dict()
        before, inits, updates = play_round(method, ranks, examples, generator)
        modules = [method.modules_of(init.client_id) for init in inits] if name == "fedplora" else None
        stats = method.aggregate(u for u in updates)
        after = method.global_delta()
        for layer in shapes:
            expected = expected_global(name, shapes, method, state_before, before, updates, layer, modules, **options)
            torch.testing.assert_close(after[layer].double(), expected, rtol=1e-4, atol=1e-5)

        # Noise figures, from their definitions.
        init_gaps = [
            frobenius({layer: before[layer] - init.effective_delta()[layer].double() for layer in shapes})
            for init in inits
        ]
        total = sum(examples)
        ideal = {
            layer: sum(u.num_examples / total * end_delta(i, u, layer) for i, u in zip(inits, updates))
            for layer in shapes
        }
        agg_gap = frobenius({layer: ideal[layer] - after[layer].double() for layer in shapes})
        assert stats.init_noise == pytest.approx(sum(init_gaps) / len(init_gaps), rel=1e-3, abs=1e-5)
        assert stats.agg_noise == pytest.approx(agg_gap, rel=1e-3, abs=1e-5)
        norm_before = frobenius(before)
        if norm_before > 1e-6:
            assert stats.init_noise_rel == pytest.approx(stats.init_noise / norm_before, rel=1e-3, abs=1e-6)
        assert stats.clients_aggregated == stats.clients_initialised == len(examples)
        assert stats.num_examples == total
        assert stats.bytes_up == sum(4 * (t.numel()) for u in updates for t in (*u.B.values(), *u.A.values()))
        assert stats.bytes_down == sum(i.nbytes() for i in inits)
        if name in ("flora", "flexlora", "hlora"):
            assert stats.agg_noise == 0.0
        if name in ("fedit", "flora", "fedplora"):
            assert stats.init_noise == 0.0


# ------------------------------------------------------------------ rejections


def _good_updates(method, ranks):
    updates = []
    for client, rank in enumerate(ranks):
        init = method.client_init(client, rank)
        updates.append(ClientUpdate(client, rank, 10, dict(init.B), dict(init.A)))
    return updates


def _with(update, **changes):
    fields = {"client_id": update.client_id, "rank": update.rank, "num_examples": update.num_examples}
    fields.update(B=dict(update.B), A=dict(update.A))
    fields.update(changes)
    return ClientUpdate(**fields)


def _nan_in(factors, layer):
    broken = dict(factors)
    broken[layer] = factors[layer].clone()
    broken[layer][0, 0] = float("nan")
    return broken


BAD_UPDATES = {
    "not initialised": (lambda u: _with(u, client_id="stranger"), "not given client_init"),
    "wrong rank": (lambda u: _with(u, rank=u.rank + 1), "rank"),
    "missing layer": (lambda u: _with(u, B={"q": u.B["q"]}), "missing ['v']"),
    "unexpected layer": (lambda u: _with(u, A={**u.A, "k": u.A["q"]}), "unexpected ['k']"),
    "wrong shape": (lambda u: _with(u, B={**u.B, "q": u.B["q"][:-1]}), "has shape"),
    "NaN": (lambda u: _with(u, A=_nan_in(u.A, "v")), "NaN or Inf"),
    "Inf": (lambda u: _with(u, B={**u.B, "q": u.B["q"] + float("inf")}), "NaN or Inf"),
    "integer dtype": (lambda u: _with(u, B={**u.B, "v": u.B["v"].int()}), "float dtype"),
    "no examples": (lambda u: _with(u, num_examples=0), "num_examples"),
}


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("problem", sorted(BAD_UPDATES))
def test_bad_update_is_rejected_without_touching_the_global_state(name, problem):
    method = create_method(name, SHAPES, 4, scale=SCALE, seed=0)
    generator = torch.Generator().manual_seed(0)
    method.aggregate(play_round(method, ranks_for(name, 2, 4), [3, 4], generator)[2])
    before = method.global_delta()
    saved = method.state_dict()
    updates = _good_updates(method, ranks_for(name, 3, 4, seed=1))
    corrupt, message = BAD_UPDATES[problem]
    stream = [updates[0], corrupt(updates[1]), updates[2]]
    with pytest.raises(ValueError, match="client") as error:
        method.aggregate(iter(stream))
    assert message in str(error.value)
    for layer, delta in method.global_delta().items():
        assert torch.equal(delta, before[layer])
    assert method.round == saved["meta"]["round"]
    # The round stays open: the good updates still aggregate.
    stats = method.aggregate(iter([updates[0], updates[2]]))
    assert stats.clients_aggregated == 2 and stats.clients_initialised == 3


def test_duplicate_update_and_double_init_are_rejected():
    method = create_method("fedplora", SHAPES, 4, seed=0)
    updates = _good_updates(method, [2, 3])
    with pytest.raises(ValueError, match="client 1 sent more than one update"):
        method.aggregate([updates[0], updates[1], updates[1]])
    with pytest.raises(ValueError, match="already given client_init"):
        method.client_init(0, 2)
    with pytest.raises(ValueError, match="no client updates"):
        method.aggregate([])


def test_fedit_refuses_unequal_ranks():
    method = create_method("fedit", SHAPES, 8)
    with pytest.raises(ValueError, match=r"client 'c': fedit is the homogeneous baseline.*max_rank=8.*ranks are \[4\]"):
        method.client_init("c", 4)


def test_invalid_construction_names_what_to_change():
    with pytest.raises(ValueError, match="unknown method 'lora'; choose one of"):
        create_method("lora", SHAPES, 4)
    with pytest.raises(ValueError, match="has no option 'weighting'; its options are \\['weighted'\\]"):
        create_method("fedplora", SHAPES, 4, weighting="data")
    with pytest.raises(ValueError, match="weighting must be one of"):
        create_method("hetlora", SHAPES, 4, weighting="size")
    with pytest.raises(ValueError, match="max_rank=9 exceeds the smallest target dimension \\(8\\)"):
        create_method("hlora", SHAPES, 9)
    with pytest.raises(ValueError, match="scale must be a positive"):
        create_method("hlora", SHAPES, 4, scale=0)
    with pytest.raises(ValueError, match="rank 5 for layer 'q' must be an integer in \\[1, max_rank=4\\]"):
        create_method("hlora", SHAPES, 4).client_init(0, 5)


# ------------------------------------------------- determinism and persistence


def _run(name, seed, rounds=3):
    method = create_method(name, SHAPES, 4, scale=SCALE, seed=seed)
    generator = torch.Generator().manual_seed(99)
    for _ in range(rounds):
        method.aggregate(play_round(method, ranks_for(name, 3, 4), [2, 3, 4], generator)[2])
    return method.global_delta()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_same_seed_same_run(name):
    first, second, other = _run(name, 7), _run(name, 7), _run(name, 8)
    assert all(torch.equal(first[layer], second[layer]) for layer in SHAPES)
    assert not all(torch.equal(first[layer], other[layer]) for layer in SHAPES)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_saved_state_continues_exactly(name, tmp_path):
    method = create_method(name, SHAPES, 4, scale=SCALE, seed=1, **({"weighted": True} if name == "fedplora" else {}))
    generator = torch.Generator().manual_seed(5)
    for _ in range(2):
        method.aggregate(play_round(method, ranks_for(name, 3, 4), [2, 3, 4], generator)[2])
    save_state(method, tmp_path / "state.safetensors")
    restored = load_state(tmp_path / "state.safetensors")
    assert type(restored) is type(method) and restored.round == 2 and restored.options == method.options
    # The same next round on both: identical starts (random draws included) and results.
    ranks = ranks_for(name, 3, 4, seed=3)
    for copy in (method, restored):
        inits = [copy.client_init(c, r) for c, r in enumerate(ranks)]
        copy.aggregate(
            ClientUpdate(c, r, 5, {k: 2 * v for k, v in i.B.items()}, i.A) for c, r, i in zip(range(3), ranks, inits)
        )
    for layer in SHAPES:
        assert torch.equal(method.global_delta()[layer], restored.global_delta()[layer])
    wrong = create_method(name, {"q": (12, 10)}, 4, scale=SCALE)
    with pytest.raises(ValueError, match="saved state has shapes"):
        wrong.load_state_dict(method.state_dict())


# --------------------------------------------------------------- Fed-PLoRA


def test_fedplora_selection_is_uniform_and_fresh_each_round():
    R, rank, draws = 16, 4, 4000
    method = create_method("fedplora", {"q": (16, 16)}, R, seed=11)
    counts = torch.zeros(R)
    selections = []
    for client in range(draws):
        method.client_init(client, rank)
        chosen = method.modules_of(client)["q"]
        assert len(set(chosen.tolist())) == rank
        counts[chosen] += 1
        selections.append(tuple(chosen.tolist()))
    expected = draws * rank / R
    # Binomial spread: sd = sqrt(n p (1 - p)) ~ 27; 5 sd is far beyond chance.
    spread = math.sqrt(draws * (rank / R) * (1 - rank / R))
    assert (counts - expected).abs().max() < 5 * spread
    # C(16, 4) = 1820 subsets; 4000 uniform draws hit about 1820 (1 - e^(-4000/1820)) = 1618.
    assert len(set(selections)) > 1500


def test_fedplora_homogeneous_is_fedit():
    generator = torch.Generator().manual_seed(8)
    fedit = create_method("fedit", SHAPES, 4, scale=SCALE, seed=2)
    plora = create_method("fedplora", SHAPES, 4, scale=SCALE, seed=2, weighted=True)
    for _ in range(3):
        inits = [fedit.client_init(c, 4) for c in range(3)]
        plora_inits = [plora.client_init(c, 4) for c in range(3)]
        for a, b in zip(inits, plora_inits):
            assert not b.fold and all(torch.equal(a.B[k], b.B[k]) and torch.equal(a.A[k], b.A[k]) for k in SHAPES)
        updates = [ClientUpdate(c, 4, 3 + 5 * c, *perturbed(i, generator)) for c, i in enumerate(inits)]
        fedit.aggregate(updates)
        plora.aggregate(updates)
        for layer in SHAPES:
            torch.testing.assert_close(plora.global_delta()[layer], fedit.global_delta()[layer])


def test_fedplora_untrained_modules_keep_their_values():
    method = create_method("fedplora", {"q": (10, 10)}, 8, seed=0)
    generator = torch.Generator().manual_seed(1)
    method.aggregate(play_round(method, [8], [1], generator)[2])
    before = method.state_dict()["tensors"]
    init = method.client_init(0, 2)
    picked = method.modules_of(0)["q"].tolist()
    method.aggregate([ClientUpdate(0, 2, 1, *perturbed(init, generator))])
    after = method.state_dict()["tensors"]
    for j in range(8):
        same = torch.equal(before["global.q.A"][j], after["global.q.A"][j])
        assert same == (j not in picked)


# ------------------------------------------------------------ other options


def test_hlora_takes_ranks_per_layer():
    method = create_method("hlora", SHAPES, 4, scale=SCALE)
    init = method.client_init("c", {"q": 4, "v": 1})
    assert init.B["q"].shape == (12, 4) and init.A["v"].shape == (1, 10)
    method.aggregate([ClientUpdate("c", {"q": 4, "v": 1}, 3, *perturbed(init, torch.Generator()))])
    with pytest.raises(ValueError, match="must name exactly the layers"):
        method.client_init("d", {"q": 2})


def test_aggregate_streams_a_generator_once():
    method = create_method("flexlora", SHAPES, 4)
    consumed = []

    def stream():
        for update in _good_updates(method, [1, 2, 4]):
            consumed.append(update.client_id)
            yield update

    stats = method.aggregate(stream())
    assert consumed == [0, 1, 2] and stats.clients_aggregated == 3


def test_hetlora_revives_components_no_client_covered():
    method = create_method("hetlora", {"q": (6, 6)}, 4, seed=0)
    init = method.client_init(0, 1)
    method.aggregate([ClientUpdate(0, 1, 1, *perturbed(init, torch.Generator()))])
    wide = method.client_init(1, 4)
    # Zero-padding emptied components 1..3; they restart as fresh LoRA (B = 0, A random).
    assert torch.equal(wide.B["q"][:, 1:], torch.zeros(6, 3))
    assert (wide.A["q"][1:].abs() > 0).all()


def _prune(init):
    """A client that pruned its tail: its start, cut to the kept components, plus noise."""
    B, A = perturbed(init, torch.Generator().manual_seed(7))
    keep = init.hook.keep
    return ClientUpdate(
        init.client_id,
        init.hook.shrunk_ranks(init.layer_ranks()),
        3,
        {layer: B[layer][:, : keep[layer]] for layer in B},
        {layer: A[layer][: keep[layer]] for layer in A},
    )


def test_hetlora_self_pruning_shrinks_the_client_and_survives_a_checkpoint(tmp_path):
    method = create_method("hetlora", SHAPES, 6, scale=SCALE, seed=0, prune_weight=0.1, prune_gamma=0.5)
    pruner, keeper, smallest = method.client_init(0, 4), method.client_init(1, 6), method.client_init(2, 1)
    assert pruner.hook.weight == 0.1 and dict(pruner.hook.keep) == {"q": 2, "v": 2}
    assert dict(keeper.hook.keep) == {"q": 3, "v": 3}
    assert smallest.hook is NO_HOOK  # rank 1 has no tail to prune
    pruned = _prune(pruner)
    kept = ClientUpdate(1, 6, 5, *perturbed(keeper, torch.Generator().manual_seed(8)))
    small = ClientUpdate(2, 1, 2, *perturbed(smallest, torch.Generator().manual_seed(9)))
    method.aggregate([pruned, kept, small])

    # The pruned client counts as a rank-2 client zero-padded to R, weighted by its norm.
    updates = [pruned, kept, small]
    for layer, (d, k) in SHAPES.items():
        weights = [float(torch.linalg.matrix_norm(SCALE * u.B[layer] @ u.A[layer])) for u in updates]
        B = sum(
            w * torch.cat([u.B[layer], torch.zeros(d, 6 - u.B[layer].shape[1])], 1) for w, u in zip(weights, updates)
        )
        A = sum(
            w * torch.cat([u.A[layer], torch.zeros(6 - u.A[layer].shape[0], k)], 0) for w, u in zip(weights, updates)
        )
        expected = SCALE * (B / sum(weights)) @ (A / sum(weights))
        torch.testing.assert_close(method.global_delta()[layer], expected, atol=1e-5, rtol=1e-5)

    assert method.pruned_ranks == {0: {"q": 2, "v": 2}}
    save_state(method, tmp_path / "state.safetensors")
    restored = load_state(tmp_path / "state.safetensors")
    assert restored.pruned_ranks == {0: {"q": 2, "v": 2}}
    # From now on client 0 trains at rank 2, whatever it asks for, and may prune to 1.
    again = restored.client_init(0, 4)
    assert again.rank == {"q": 2, "v": 2} and again.B["q"].shape == (12, 2)
    assert dict(again.hook.keep) == {"q": 1, "v": 1}
    assert restored.client_init(1, 6).B["q"].shape == (12, 6)


def test_hetlora_rejects_a_rank_the_client_was_not_offered():
    method = create_method("hetlora", SHAPES, 6, prune_weight=0.1, prune_gamma=0.5)
    init = method.client_init(0, 4)
    B, A = perturbed(init, torch.Generator())
    cut = ClientUpdate(0, 3, 1, {k: v[:, :3] for k, v in B.items()}, {k: v[:3] for k, v in A.items()})
    with pytest.raises(ValueError, match=r"initialised at \{'q': 4, 'v': 4\} \(or \{'q': 2, 'v': 2\} if shrunk\)"):
        method.aggregate([cut])
    # Without self-pruning, a smaller update is refused outright.
    plain = create_method("hetlora", SHAPES, 6)
    init = plain.client_init(0, 4)
    assert init.hook is NO_HOOK
    with pytest.raises(ValueError, match=r"initialised at \{'q': 4, 'v': 4\}$"):
        plain.aggregate([ClientUpdate(0, 2, 1, {k: v[:, :2] for k, v in B.items()}, {k: v[:2] for k, v in A.items()})])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"prune_weight": -0.1}, "prune_weight must be a finite number >= 0"),
        ({"prune_weight": float("nan")}, "prune_weight must be a finite number >= 0"),
        ({"prune_gamma": 1.0}, r"prune_gamma must be a number in \(0, 1\)"),
        ({"prune_gamma": 0}, r"prune_gamma must be a number in \(0, 1\)"),
    ],
)
def test_hetlora_pruning_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        create_method("hetlora", SHAPES, 4, **options)


def test_a_state_saved_before_an_option_existed_loads_with_its_default():
    method = create_method("hetlora", SHAPES, 4, seed=0)
    state = method.state_dict()
    state["meta"]["options"] = {"weighting": "norm"}  # as saved before self-pruning
    create_method("hetlora", SHAPES, 4, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="saved state has options="):
        create_method("hetlora", SHAPES, 4, seed=0, prune_weight=0.5).load_state_dict(state)
