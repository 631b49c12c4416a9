"""Server-side cost of one federated round for each method, on Llama-3.1-8B shapes.

One round is what the server does: ``client_init`` for every sampled client, then
``aggregate`` of their updates. Clients do not train here: an update is the client's
start plus small seeded noise, synthesised lazily inside the generator that
``aggregate`` consumes; the time spent synthesising is measured and subtracted, so the
reported aggregate time is the method's own. Each method runs in a fresh process
(forked from a server that has imported torch), so its peak RSS is its own.

    .venv/bin/python benchmarks/methods.py                 # full size, all six methods
    .venv/bin/python benchmarks/methods.py --smoke         # tiny shapes, a few seconds (CI)
    .venv/bin/python benchmarks/methods.py --methods fedplora hlora --layers 4 --out table.md
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import random
import resource
import shlex
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from fedray.methods import METHODS, ClientInit, ClientUpdate, Method, create_method

#: Rank a client may train at, drawn uniformly per client and round.
CLIENT_RANKS = (2, 4, 8, 16)
#: Server-side round time each method should stay under on the 2-core reference machine.
TARGETS_S = {"fedplora": 1.0, "flexlora": 10.0, "hlora": 10.0}
#: The homogeneous baseline: every client trains at max_rank.
HOMOGENEOUS_METHODS = frozenset({"fedit"})
BYTES_PER_MB = 1e6
BYTES_PER_MIB = 2**20


def core_count() -> int:
    """Cores this process may run on (what nproc prints)."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark setting; defaults are Llama-3.1-8B with LoRA on q_proj and v_proj."""

    #: Transformer blocks, each with one q_proj and one v_proj target.
    layers: int = 32
    #: q_proj weight shape (d x k, as torch stores it).
    q_shape: tuple[int, int] = (4096, 4096)
    #: v_proj weight shape (grouped-query attention: 8 KV heads of 128).
    v_shape: tuple[int, int] = (1024, 4096)
    #: The global rank R.
    max_rank: int = 16
    #: Clients sampled per round.
    clients: int = 10
    #: Measured rounds after the warm-up round 0.
    rounds: int = 3
    #: LoRA scale s (one constant for the run; it does not change the cost).
    scale: float = 1.0
    #: Standard deviation of the noise that stands in for local training.
    update_noise_std: float = 1e-3
    #: torch intra-op threads; the core count by default.
    threads: int = field(default_factory=core_count)
    #: A client's number of examples is drawn uniformly from this range (inclusive).
    num_examples_range: tuple[int, int] = (50, 500)
    seed: int = 0

    def is_reference(self) -> bool:
        """Whether this is the setting the targets are stated for (any rounds, seed, threads)."""
        reference = BenchConfig()
        return all(
            getattr(self, name) == getattr(reference, name)
            for name in ("layers", "q_shape", "v_shape", "max_rank", "clients")
        )

    def shapes(self) -> dict[str, tuple[int, int]]:
        shapes = {}
        for block in range(self.layers):
            shapes[f"model.layers.{block}.self_attn.q_proj"] = self.q_shape
            shapes[f"model.layers.{block}.self_attn.v_proj"] = self.v_shape
        return shapes


#: --smoke: tiny shapes so that the whole run takes seconds.
SMOKE = BenchConfig(layers=2, q_shape=(64, 64), v_shape=(32, 64), rounds=1)


@dataclass(frozen=True)
class RoundTiming:
    """Server time of one round (update synthesis excluded) and its traffic."""

    round: int
    client_init_s: float
    aggregate_s: float
    #: Process CPU time (all threads) of client_init and aggregate: robust to other load on
    #: the machine, which can stretch the wall times of two-thread ops by 10x or more.
    round_cpu_s: float
    bytes_down: int
    bytes_up: int

    @property
    def round_s(self) -> float:
        return self.client_init_s + self.aggregate_s


@dataclass(frozen=True)
class MethodResult:
    method: str
    rounds: list[RoundTiming]
    #: RSS when the method's process started (torch and fedray imported).
    start_rss_bytes: int
    peak_rss_bytes: int

    def median_round(self) -> RoundTiming:
        """The measured round (round 0 excluded) with the median time; the lower one for an even count."""
        measured = sorted(self.rounds[1:], key=lambda timing: timing.round_s)
        return measured[(len(measured) - 1) // 2]


class Stopwatch:
    """Accumulates the wall time and the process CPU time spent inside ``with`` blocks."""

    def __init__(self) -> None:
        self.wall_s = 0.0
        self.cpu_s = 0.0
        self._start = (0.0, 0.0)

    def __enter__(self) -> Stopwatch:
        self._start = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s += time.perf_counter() - self._start[0]
        self.cpu_s += time.process_time() - self._start[1]


def peak_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trained(init: ClientInit, num_examples: int, config: BenchConfig, generator: torch.Generator) -> ClientUpdate:
    """A stand-in for local training: the client's start plus small noise on every factor."""

    def perturb(factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            layer: factor + config.update_noise_std * torch.randn(factor.shape, generator=generator)
            for layer, factor in factors.items()
        }

    return ClientUpdate(init.client_id, init.rank, num_examples, B=perturb(init.B), A=perturb(init.A))


def synthesize_updates(
    handed_out: deque[tuple[ClientInit, int]], config: BenchConfig, generator: torch.Generator, clock: Stopwatch
) -> Iterator[ClientUpdate]:
    """Yield one update at a time, dropping each client's start once its update is made."""
    while handed_out:
        init, num_examples = handed_out.popleft()
        with clock:
            update = trained(init, num_examples, config, generator)
        del init
        yield update
        del update


def run_round(
    method: Method, round_index: int, config: BenchConfig, draws: random.Random, generator: torch.Generator
) -> RoundTiming:
    """One round: client_init for ``config.clients`` new clients, then aggregate of their updates."""
    handed_out: deque[tuple[ClientInit, int]] = deque()
    init_clock = Stopwatch()
    for slot in range(config.clients):
        client_id = round_index * config.clients + slot
        # Drawn for every method, so that all of them see the same data sizes.
        rank = draws.choice(CLIENT_RANKS)
        if method.name in HOMOGENEOUS_METHODS:
            rank = config.max_rank
        num_examples = draws.randint(*config.num_examples_range)
        with init_clock:
            init = method.client_init(client_id, rank)
        handed_out.append((init, num_examples))
        del init
    synthesis_clock, aggregate_clock = Stopwatch(), Stopwatch()
    with aggregate_clock:
        stats = method.aggregate(synthesize_updates(handed_out, config, generator, synthesis_clock))
    return RoundTiming(
        round=round_index,
        client_init_s=init_clock.wall_s,
        aggregate_s=aggregate_clock.wall_s - synthesis_clock.wall_s,
        round_cpu_s=init_clock.cpu_s + aggregate_clock.cpu_s - synthesis_clock.cpu_s,
        bytes_down=stats.bytes_down,
        bytes_up=stats.bytes_up,
    )


def bench_method(method_name: str, config: BenchConfig) -> MethodResult:
    """Round 0 (warm-up, zero global delta) plus ``config.rounds`` measured rounds."""
    torch.set_num_threads(config.threads)
    start_rss = peak_rss_bytes()
    method = create_method(method_name, config.shapes(), config.max_rank, scale=config.scale, seed=config.seed)
    # The same seed for every method: the same rank and data-size draws (fedit's ranks aside).
    draws = random.Random(config.seed)
    noise = torch.Generator().manual_seed(config.seed)
    rounds = [run_round(method, index, config, draws, noise) for index in range(config.rounds + 1)]
    return MethodResult(method_name, rounds, start_rss, peak_rss_bytes())


def bench_isolated(method_name: str, context: multiprocessing.context.BaseContext, config: BenchConfig) -> MethodResult:
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(bench_method, method_name, config).result()


def machine_description(threads: int) -> str:
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{core_count()} cores (nproc), {model}, torch {torch.__version__}, torch threads: {threads}, "
        f"Python {platform.python_version()}"
    )


def target_cell(result: MethodResult, config: BenchConfig) -> str:
    target_s = TARGETS_S.get(result.method)
    if target_s is None:
        return "-"
    if not config.is_reference():
        return f"< {target_s:g} s at full size"
    verdict = "met" if result.median_round().round_s < target_s else "MISSED"
    return f"< {target_s:g} s: {verdict}"


TABLE_HEADER = (
    "| method | round s (median) | client_init s | aggregate s | round CPU s | round 0 s | peak RSS MiB "
    "| RSS growth MiB | down MB | up MB | target |"
)


def table_row(result: MethodResult, config: BenchConfig) -> str:
    median = result.median_round()
    cells = [
        result.method,
        f"{median.round_s:.3f}",
        f"{median.client_init_s:.3f}",
        f"{median.aggregate_s:.3f}",
        f"{median.round_cpu_s:.3f}",
        f"{result.rounds[0].round_s:.3f}",
        f"{result.peak_rss_bytes / BYTES_PER_MIB:.0f}",
        f"{(result.peak_rss_bytes - result.start_rss_bytes) / BYTES_PER_MIB:.0f}",
        f"{median.bytes_down / BYTES_PER_MB:.1f}",
        f"{median.bytes_up / BYTES_PER_MB:.1f}",
        target_cell(result, config),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown_table(results: Sequence[MethodResult], config: BenchConfig) -> str:
    separator = "|" + "---|" * (TABLE_HEADER.count("|") - 1)
    return "\n".join([TABLE_HEADER, separator, *(table_row(result, config) for result in results)])


def report(results: Sequence[MethodResult], config: BenchConfig, command: str, load_before: float) -> str:
    d_q, k_q = config.q_shape
    d_v, k_v = config.v_shape
    ranks = ", ".join(map(str, CLIENT_RANKS))
    return "\n".join(
        [
            f"Machine: {machine_description(config.threads)}",
            "",
            # Other work on the machine makes two-thread timings swing by 10x or more.
            f"Load average (1 min): {load_before:.2f} before the run, {os.getloadavg()[0]:.2f} after.",
            "",
            f"Command: `{command}`",
            "",
            f"Setting: {config.layers} layers x (q_proj {d_q}x{k_q}, v_proj {d_v}x{k_v}), R = {config.max_rank}, "
            f"{config.clients} clients per round, ranks drawn from {{{ranks}}} (fedit: all {config.max_rank}), "
            f"median of rounds 1..{config.rounds} after warm-up round 0. Update synthesis excluded "
            "(timed inside the update generator and subtracted). MB = 10^6 bytes, per round.",
            "",
            markdown_table(results, config),
            "",
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds", type=int, help=f"measured rounds after warm-up round 0 (default {BenchConfig.rounds})"
    )
    parser.add_argument("--clients", type=int, help=f"clients per round (default {BenchConfig.clients})")
    parser.add_argument("--layers", type=int, help=f"transformer blocks (default {BenchConfig.layers})")
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="default: all of them"
    )
    parser.add_argument(
        "--seed", type=int, help=f"seed of the rank, data-size and noise draws (default {BenchConfig.seed})"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: the core count)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and one measured round: seconds, for CI")
    parser.add_argument("--out", type=Path, help="also write the markdown report to this file")
    args = parser.parse_args(argv)
    for name in ("rounds", "clients", "layers", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1, got {value}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = SMOKE if args.smoke else BenchConfig()
    overrides = {name: getattr(args, name) for name in ("rounds", "clients", "layers", "seed", "threads")}
    config = replace(config, **{name: value for name, value in overrides.items() if value is not None})

    load_before = os.getloadavg()[0]
    context = multiprocessing.get_context("forkserver")
    # Every method's process forks from one that has already paid for these imports.
    context.set_forkserver_preload(["torch", "fedray.methods"])
    results = []
    print(TABLE_HEADER, flush=True)
    for method_name in args.methods:
        result = bench_isolated(method_name, context, config)
        print(table_row(result, config), flush=True)
        results.append(result)

    given = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__), *given])
    text = report(results, config, command, load_before)
    print()
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
