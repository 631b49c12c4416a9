"""Fed-PLoRA's module similarity: the streaming statistic, the method's heatmap, its drawing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from fedray.driver.figures import draw_heatmap
from fedray.methods import ClientUpdate, create_method
from fedray.methods.fedplora import ModuleSimilarity

NUM_CLIENTS = 5
PLORA_RANK = 6
MODULE_LENGTH = 64
NOISE_STD = 0.01


def plora_modules(seed: int, dropped: dict[int, set[int]] | None = None) -> list[dict[int, torch.Tensor]]:
    """Module j of every client = the same j-th orthonormal direction + small noise."""
    generator = torch.Generator().manual_seed(seed)
    directions, _ = torch.linalg.qr(torch.randn(MODULE_LENGTH, PLORA_RANK, generator=generator))
    clients = []
    for client in range(NUM_CLIENTS):
        modules = {}
        for module in range(PLORA_RANK):
            if module in (dropped or {}).get(client, set()):
                continue
            noise = torch.randn(MODULE_LENGTH, generator=generator) * NOISE_STD
            modules[module] = (directions[:, module] + noise) * (client + 1)  # cosine ignores size
        clients.append(modules)
    return clients


def similarity_of(clients: list[dict[int, torch.Tensor]]) -> np.ndarray:
    similarity = ModuleSimilarity(PLORA_RANK)
    for modules in clients:
        similarity.add(modules)
    return similarity.matrix().numpy()


def test_module_similarity_has_a_bright_diagonal() -> None:
    similarity = similarity_of(plora_modules(seed=0))

    assert similarity.shape == (PLORA_RANK, PLORA_RANK)
    off_diagonal = ~np.eye(PLORA_RANK, dtype=bool)
    assert np.all(np.diag(similarity) > 0.99)
    assert np.all(np.abs(similarity[off_diagonal]) < 0.05)


def test_module_similarity_averages_pairs_of_different_clients_only() -> None:
    # Module 0 is trained by client 0 alone: no pair of different clients covers (0, 0).
    dropped = {client: {0} for client in range(1, NUM_CLIENTS)}
    clients = plora_modules(seed=1, dropped=dropped)
    # Client 0's module 1 points the opposite way, so it pulls M[1, 1] down if paired with itself.
    clients[0][1] = -clients[0][1]
    similarity = similarity_of(clients)

    assert np.isnan(similarity[0, 0])
    assert not np.isnan(similarity[0, 1])
    np.testing.assert_allclose(similarity, similarity.T, equal_nan=True)
    # Independent pairwise mean for M[1, 1] and M[0, 2].
    for j, k in [(1, 1), (0, 2)]:
        cosines = [
            float(torch.nn.functional.cosine_similarity(clients[a][j].double(), clients[b][k].double(), dim=0))
            for a in range(NUM_CLIENTS)
            for b in range(NUM_CLIENTS)
            if a != b and j in clients[a] and k in clients[b]
        ]
        assert similarity[j, k] == pytest.approx(np.mean(cosines), abs=1e-9)
    # Ordered pairs that include client 0 have cosine -1, the rest +1.
    flipped_share = 2 / NUM_CLIENTS
    assert similarity[1, 1] == pytest.approx((1 - flipped_share) - flipped_share, abs=0.02)


def test_module_similarity_rejects_modules_outside_the_rank() -> None:
    similarity = ModuleSimilarity(PLORA_RANK)
    with pytest.raises(ValueError, match="outside"):
        similarity.add({PLORA_RANK: torch.ones(3)})
    similarity.add({0: torch.ones(3)})
    with pytest.raises(ValueError, match="different lengths"):
        similarity.add({1: torch.ones(4)})


def test_a_round_of_fedplora_offers_the_similarity_of_what_its_clients_trained(tmp_path: Path) -> None:
    shapes = {"q": (MODULE_LENGTH, MODULE_LENGTH), "v": (MODULE_LENGTH, 8)}
    method = create_method("fedplora", shapes, PLORA_RANK, scale=2.0, seed=0)
    assert method.heatmaps() == {}  # nothing aggregated yet
    generator = torch.Generator().manual_seed(0)
    updates, clients, changes = [], [], []
    for client, rank in enumerate([2, 4, 6]):
        init = method.client_init(client, rank)
        # Small independent steps from the handed-out modules, as a few local steps take.
        B = {layer: b + 0.01 * torch.randn(b.shape, generator=generator) for layer, b in init.B.items()}
        A = {layer: a + 0.01 * torch.randn(a.shape, generator=generator) for layer, a in init.A.items()}
        chosen = method.modules_of(client)

        # Independently: module j is its B column and A row of every layer, in layer order.
        def module_vectors(B, A, chosen=chosen):
            return {
                j: torch.cat([torch.cat([B[layer][:, column], A[layer][column]]) for layer in shapes])
                for column, j in enumerate(chosen["q"].tolist())
            }

        clients.append(module_vectors(B, A))
        change_B = {layer: B[layer] - init.B[layer] for layer in B}
        changes.append(module_vectors(change_B, {layer: A[layer] - init.A[layer] for layer in A}))
        updates.append(ClientUpdate(client, rank, 10, B, A))
    method.aggregate(updates)

    heatmap = method.heatmaps()["module_similarity"]
    np.testing.assert_allclose(heatmap.values.numpy(), similarity_of(clients), equal_nan=True, atol=1e-12)
    assert heatmap.title == "Fed-PLoRA module similarity across clients, round 1"
    # Of the changes: every client starts a module from the same values, so the trained
    # factors look alike on the diagonal while independent random changes do not.
    changed = method.heatmaps()["module_change_similarity"].values.numpy()
    np.testing.assert_allclose(changed, similarity_of(changes), equal_nan=True, atol=1e-12)
    assert np.nanmean(np.diag(changed)) < 0.5 < np.nanmean(np.diag(heatmap.values.numpy()))
    out_png = tmp_path / "figures" / "module_similarity.png"
    draw_heatmap(heatmap, out_png)
    image = imread(out_png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.shape[2] in (3, 4)
