"""Bytes down and up per client per round for each method, against closed-form formulas.

For each of the six methods, a few rounds of the method's own ``client_init`` and
``aggregate`` run at MiniLM shapes and at Llama-3.1-8B shapes. Clients do not train:
an update is the client's start plus small seeded noise, which has the shapes a trained
update has, and traffic depends only on shapes. Every client's download is read from its
``ClientInit.nbytes()`` and upload from ``ClientUpdate.nbytes()``; the round's totals must
equal ``RoundStats.bytes_down`` / ``bytes_up`` (what fedray logs to MLflow). Each is
checked against its formula (shared/METHODS.md; float32 factors, 4 bytes a number):

    per target layer of shape d x k, client rank r, global rank R, m = d + k
    up (every method):      4 r m
    down, fedit:            4 R m                        (every client at rank R)
    down, hetlora:          4 r m                        (the leading r components)
    down, flexlora, hlora:  4 r m                        (the top r singular triplets)
    down, fedplora:         4 (r m + min((R - r) m, d k))  (the other R - r modules folded;
                                                          no fold when r = R)
    down, flora:            4 (r m + min(q m, d k))      (fresh adapter + the whole global
                                                          delta, q = sum of the ranks of
                                                          all earlier rounds' clients)

A fold travels as factors or dense, whichever is smaller: the ``min``. The script fails
(exit code 1) if any client's bytes differ from its formula. ``pickled`` is the size of
the pickled ``ClientInit`` / ``ClientUpdate``, close to what Ray ships.

    .venv/bin/python benchmarks/system/traffic.py                 # MiniLM and 32-block Llama shapes
    .venv/bin/python benchmarks/system/traffic.py --smoke         # 2 Llama blocks, seconds (CI)
    .venv/bin/python benchmarks/system/traffic.py --rounds 4 --out traffic.md
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from harness import BYTES_PER_MB, add_common_arguments, finish, markdown_table, start

from fedray.methods import METHODS, ClientInit, ClientUpdate, create_method

#: Bytes of one float32 number: every factor and fold travels in float32.
FLOAT_BYTES = 4
#: Client ranks, given in turn to the clients of a round (so every round has each rank).
CLIENT_RANKS = (2, 4, 8, 16)
#: The global rank R.
MAX_RANK = 16
#: LoRA scale (one for the run; it does not change traffic).
SCALE = 2.0
#: Standard deviation of the noise that stands in for local training.
UPDATE_NOISE_STD = 1e-3
#: The homogeneous baseline: every client at MAX_RANK.
HOMOGENEOUS_METHODS = frozenset({"fedit"})
#: Examples a client reports (only weights aggregation; traffic does not depend on it).
NUM_EXAMPLES = 100
#: torch threads: bytes do not depend on speed, and one thread keeps the run short on a
#: shared machine (two threads waiting for each other took 6x longer at load average 2.6).
TORCH_THREADS = 1
#: Formula of the bytes a client downloads per round, per target layer (m = d + k).
DOWN_FORMULAS = {
    "fedit": "4 R m",
    "flora": "4 (r m + min(q m, d k))",
    "flexlora": "4 r m",
    "hetlora": "4 r m",
    "hlora": "4 r m",
    "fedplora": "4 (r m + min((R - r) m, d k))",
}
UP_FORMULA = "4 r m"


@dataclass(frozen=True)
class ShapeSet:
    """Target layers of one model: ``blocks`` transformer blocks, each with a query and a value projection."""

    name: str
    blocks: int
    query: tuple[int, int]
    value: tuple[int, int]
    #: Clients sampled per round.
    clients: int

    def shapes(self) -> dict[str, tuple[int, int]]:
        shapes = {}
        for block in range(self.blocks):
            shapes[f"layers.{block}.query"] = self.query
            shapes[f"layers.{block}.value"] = self.value
        return shapes

    def describe(self) -> str:
        (d_q, k_q), (d_v, k_v) = self.query, self.value
        return f"{self.blocks} blocks x (query {d_q}x{k_q}, value {d_v}x{k_v}), {self.clients} clients a round"


#: all-MiniLM-L6-v2 (BERT): 6 blocks, hidden size 384; LoRA on query and value.
MINILM = ShapeSet("minilm", blocks=6, query=(384, 384), value=(384, 384), clients=4)
#: Llama-3.1-8B: 32 blocks; q_proj 4096 x 4096, v_proj 1024 x 4096 (8 KV heads of 128).
LLAMA = ShapeSet("llama-3.1-8b", blocks=32, query=(4096, 4096), value=(1024, 4096), clients=10)
#: --smoke: Llama's layer shapes, two blocks (the formulas are per layer).
LLAMA_SMOKE = ShapeSet("llama-3.1-8b (2 blocks)", blocks=2, query=(4096, 4096), value=(1024, 4096), clients=10)


def client_rank(method_name: str, slot: int) -> int:
    return MAX_RANK if method_name in HOMOGENEOUS_METHODS else CLIENT_RANKS[slot % len(CLIENT_RANKS)]


def layer_bytes_up(shape: tuple[int, int], rank: int) -> int:
    d, k = shape
    return FLOAT_BYTES * rank * (d + k)


def fold_numbers(shape: tuple[int, int], rank: int) -> int:
    """Numbers in a rank-``rank`` fold as it travels: factors or dense, whichever is smaller."""
    d, k = shape
    return min(rank * (d + k), d * k)


def layer_bytes_down(method_name: str, shape: tuple[int, int], rank: int, flora_rank: int) -> int:
    """The formula of a client's download for one layer (``flora_rank`` = q, FLoRA's stacked global rank)."""
    d, k = shape
    factors = rank * (d + k)
    if method_name == "fedplora":
        return FLOAT_BYTES * (factors + fold_numbers(shape, MAX_RANK - rank))
    if method_name == "flora":
        return FLOAT_BYTES * (factors + fold_numbers(shape, flora_rank))
    return FLOAT_BYTES * factors


@dataclass
class ClientTraffic:
    round: int
    rank: int
    down: int
    up: int
    down_formula: int
    up_formula: int
    down_pickled: int
    up_pickled: int

    @property
    def matches(self) -> bool:
        return self.down == self.down_formula and self.up == self.up_formula


@dataclass
class MethodTraffic:
    shape_set: str
    method: str
    clients: list[ClientTraffic] = field(default_factory=list)
    #: Rounds whose RoundStats totals equal the sums of the clients' bytes.
    round_totals_match: list[bool] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        return all(client.matches for client in self.clients) and all(self.round_totals_match)

    def at(self, round_index: int, rank: int) -> ClientTraffic | None:
        found = [c for c in self.clients if c.round == round_index and c.rank == rank]
        return found[0] if found else None


def trained(init: ClientInit, generator: torch.Generator) -> ClientUpdate:
    """A stand-in for local training: the client's start plus small noise on every factor."""

    def perturb(factors):
        return {
            layer: factor + UPDATE_NOISE_STD * torch.randn(factor.shape, generator=generator)
            for layer, factor in factors.items()
        }

    return ClientUpdate(init.client_id, init.rank, NUM_EXAMPLES, B=perturb(init.B), A=perturb(init.A))


def pickled_bytes(payload: ClientInit | ClientUpdate) -> int:
    return len(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))


def client_traffic(
    method_name: str,
    shapes: dict[str, tuple[int, int]],
    round_index: int,
    flora_rank: int,
    init: ClientInit,
    update: ClientUpdate,
) -> ClientTraffic:
    """One client's bytes (counted and pickled) next to its formulas."""
    return ClientTraffic(
        round=round_index,
        rank=init.rank,
        down=init.nbytes(),
        up=update.nbytes(),
        down_formula=sum(layer_bytes_down(method_name, shape, init.rank, flora_rank) for shape in shapes.values()),
        up_formula=sum(layer_bytes_up(shape, init.rank) for shape in shapes.values()),
        down_pickled=pickled_bytes(init),
        up_pickled=pickled_bytes(update),
    )


def measure(method_name: str, shape_set: ShapeSet, rounds: int, seed: int) -> MethodTraffic:
    """``rounds`` rounds of one method; every client's bytes next to its formula."""
    shapes = shape_set.shapes()
    method = create_method(method_name, shapes, MAX_RANK, scale=SCALE, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    traffic = MethodTraffic(shape_set.name, method_name)
    # FLoRA's q: its global delta stacks the factors of every earlier round's clients.
    flora_rank = 0
    for round_index in range(rounds):
        ranks = [client_rank(method_name, slot) for slot in range(shape_set.clients)]
        inits = [method.client_init(round_index * shape_set.clients + slot, rank) for slot, rank in enumerate(ranks)]
        updates = [trained(init, generator) for init in inits]
        clients = [
            client_traffic(method_name, shapes, round_index, flora_rank, init, update)
            for init, update in zip(inits, updates, strict=True)
        ]
        stats = method.aggregate(updates)
        traffic.clients += clients
        traffic.round_totals_match.append(
            stats.bytes_down == sum(c.down for c in clients) and stats.bytes_up == sum(c.up for c in clients)
        )
        flora_rank += sum(ranks)
    return traffic


def megabytes(value: int) -> str:
    return f"{value / BYTES_PER_MB:.3f}"


def table(results: Sequence[MethodTraffic], rounds: int) -> str:
    """Per method: the formulas, the last round's bytes at the smallest and largest rank, and the checks."""
    last = rounds - 1
    header = [
        "shapes",
        "method",
        "down formula",
        "up formula",
        f"down MB r={CLIENT_RANKS[0]} / r={MAX_RANK}",
        f"up MB r={CLIENT_RANKS[0]} / r={MAX_RANK}",
        "pickled / counted",
        "clients checked",
        "match",
    ]
    rows = []
    for result in results:
        low, high = result.at(last, CLIENT_RANKS[0]), result.at(last, MAX_RANK)
        counted = sum(c.down + c.up for c in result.clients)
        pickled = sum(c.down_pickled + c.up_pickled for c in result.clients)
        rows.append(
            [
                result.shape_set,
                result.method,
                DOWN_FORMULAS[result.method],
                UP_FORMULA,
                f"{megabytes(low.down) if low else '-'} / {megabytes(high.down)}",
                f"{megabytes(low.up) if low else '-'} / {megabytes(high.up)}",
                f"{pickled / counted:.4f}",
                len(result.clients),
                "yes" if result.matches else "NO",
            ]
        )
    return markdown_table(header, rows)


def flora_growth(results: Sequence[MethodTraffic], rounds: int) -> str:
    """FLoRA's download grows every round: the rank-16 client's bytes, round by round."""
    header = ["shapes", *(f"round {index}" for index in range(rounds))]
    rows = []
    for result in results:
        if result.method == "flora":
            rows.append([result.shape_set, *(megabytes(result.at(i, MAX_RANK).down) for i in range(rounds))])
    return markdown_table(header, rows)


def as_json(result: MethodTraffic) -> dict:
    return {
        "shape_set": result.shape_set,
        "method": result.method,
        "down_formula": DOWN_FORMULAS[result.method],
        "up_formula": UP_FORMULA,
        "matches": result.matches,
        "round_totals_match": result.round_totals_match,
        "clients": [vars(client) for client in result.clients],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per method (default 3; FLoRA grows each round)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = start("traffic", argv, args.smoke)
    torch.set_num_threads(TORCH_THREADS)
    shape_sets = (MINILM, LLAMA_SMOKE if args.smoke else LLAMA)
    results = []
    for shape_set in shape_sets:
        for method_name in args.methods:
            result = measure(method_name, shape_set, args.rounds, args.seed)
            print(f"{shape_set.name:>24} {method_name:>9}: {'matches' if result.matches else 'DIFFERS'}", flush=True)
            results.append(result)

    settings = "; ".join(f"{shape_set.name}: {shape_set.describe()}" for shape_set in shape_sets)
    report.sections += [
        f"Setting: {settings}. R = {MAX_RANK}, client ranks {CLIENT_RANKS} in turn (fedit: all {MAX_RANK}), "
        f"{args.rounds} rounds. Bytes per client per round; MB = 10^6 bytes; the MB columns are the last round "
        f"(round {args.rounds - 1}). Formulas per target layer (d x k, m = d + k), summed over layers; q = the sum "
        "of the ranks of all earlier rounds' clients.",
        table(results, args.rounds),
        "FLoRA's download (rank-16 client, MB) by round: every client downloads the whole stacked global delta.",
        flora_growth(results, args.rounds),
    ]
    mismatched = [f"{r.shape_set}/{r.method}" for r in results if not r.matches]
    report.sections.append(
        "Every client's bytes match its formula, and every round's RoundStats totals match the clients' sums."
        if not mismatched
        else f"MISMATCH: {', '.join(mismatched)} differ from their formulas."
    )
    report.results = {
        "rounds": args.rounds,
        "max_rank": MAX_RANK,
        "client_ranks": list(CLIENT_RANKS),
        "shape_sets": [vars(shape_set) for shape_set in shape_sets],
        "all_match": not mismatched,
        "methods": [as_json(result) for result in results],
    }
    finish(report, args.out)
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
