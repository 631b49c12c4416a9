"""Orchestration overhead: fedray's rounds against a bare single-process loop doing the same work.

Both sides run the same spec. fedray: ``fedray.driver.lifecycle.run`` on a Ray started here, with
its client and evaluation tasks, aggregation actor, checkpoints and MLflow. Bare: one
process and none of that; it calls fedray's client code directly, one client at a time:
the same partition, ranks, sampled clients, method starts (``client_init``), seeds
(``sampling.client_seed``), ``Workbench.train``, ``aggregate``, head averaging and evaluation.
Each client task gets every core of the client work (``resources.num_cpus`` = that
Ray's CPUs), so fedray also trains one client at a time, with as many torch threads as
the bare loop. By default that is every core of the machine, so fedray's own processes
(driver, aggregation actor, raylet, MLflow writes) compete with the client's threads;
``--cores 1`` on 2 cores leaves them a core of their own. Every round evaluates
on both sides (``eval.every=1``), so all measured rounds do the same work.

Per round, the bare loop's time runs from sampling to the end of evaluation. fedray's
``round_s`` covers the same span; its wall time per round is the time between the
MLflow records of consecutive rounds, so it also holds the checkpoint and the MLflow
logging. Round 0 (worker start-up, first model build) is reported apart and left out of
the ratio. The two sides' train losses per round are compared too: equal losses show
that they did the same work. The machine's speed drifts over minutes (a shared 2-core
host), so the measurement is several pairs of runs, each the bare loop and then fedray:
each pair gives a ratio, and the headline is all fedray time over all bare time.

    .venv/bin/python benchmarks/system/overhead.py                 # quickstart, 6 rounds, 3 pairs of runs
    .venv/bin/python benchmarks/system/overhead.py --smoke         # tiny sizes, under a minute (CI)
    .venv/bin/python benchmarks/system/overhead.py rounds=8 method=hlora ranks=[2,4,8,16] --out overhead.md
    .venv/bin/python benchmarks/system/overhead.py --cores 1       # clients on 1 core, 1 thread
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from harness import (
    add_common_arguments,
    bench_spec,
    core_count,
    create_run_method,
    finish,
    local_ray,
    markdown_table,
    prepare_run,
    start,
)
from mlflow.tracking import MlflowClient

from fedray import inputs
from fedray.config import Spec
from fedray.driver.lifecycle import run
from fedray.driver.sampling import client_seed, sample_clients
from fedray.models import export_base, head_state
from fedray.tracking.names import EVAL_METRICS
from fedray.worker import tasks
from fedray.worker.workbench import Workbench

SPEC_FILE = "jobs/quickstart.yaml"
#: fedray's round may take at most this much longer than the bare loop's (a ratio of 1.10).
TARGET_OVERHEAD = 0.10
#: Every round evaluates, on both sides, so that every measured round does the same work.
COMMON_OVERRIDES = ("name=bench-overhead", "eval.every=1")
FULL_OVERRIDES = ("rounds=6", "eval.max_examples=200")
#: Bare-then-fedray pairs: on a shared 2-core machine one side's run alone can be 30 % slow or fast.
FULL_PAIRS = 3
SMOKE_OVERRIDES = (
    "rounds=2",
    "num_clients=4",
    "clients_per_round=2",
    "partition=iid",
    "partition_options={}",
    "dataset_options.max_examples=200",
    "train.local_steps=2",
    "train.batch_size=4",
    "train.max_seq_len=16",
    "eval.max_examples=16",
)
#: Train losses of the two sides may differ by this much (relative) and still count as the same work.
SAME_LOSS_RTOL = 1e-3
MS_PER_S = 1000.0


@dataclass
class RoundTiming:
    round: int
    #: From sampling the round's clients to the end of its evaluation.
    round_s: float
    train_loss: float
    eval_metric: float
    #: Median of the round's clients' training times, timed inside ``Workbench.train`` on both sides.
    client_s_p50: float
    #: fedray only: time between the MLflow records of this round and the one before.
    wall_s: float | None = None

    @property
    def measured_s(self) -> float:
        """The time that counts for the ratio: fedray's wall time, the bare loop's round."""
        return self.round_s if self.wall_s is None else self.wall_s


@dataclass
class Side:
    name: str
    rounds: list[RoundTiming]
    #: Bare: data, base model and workbench; fedray: starting Ray.
    setup_s: float
    #: The whole run, set-up included.
    total_s: float
    #: fedray only: worker processes that ran client tasks, and the most times one built the base.
    workers: int = 1
    max_builds: int = 1

    def measured_s(self) -> float:
        """Rounds 1.. (round 0 holds worker start-up and first builds)."""
        return sum(timing.measured_s for timing in self.rounds[1:])


def metric_name(spec: Spec) -> str:
    return EVAL_METRICS[inputs.dataset_split(spec).train.task]


def bare_loop(spec: Spec) -> Side:
    """Every round of ``spec`` in this process: fedray's client code, no Ray, no MLflow, no checkpoints."""
    started = time.perf_counter()
    tasks.set_threads(spec)  # the torch threads a client task of this spec gets
    prepared = prepare_run(spec)
    split, base = prepared.split, prepared.base
    shards, client_ranks = prepared.partition.shards, prepared.client_ranks
    bench = Workbench(export_base(base))
    method = create_run_method(spec, base)
    head = head_state(base.model) or None
    eval_set = inputs.eval_set(spec, split)
    metric = metric_name(spec)
    setup_s = time.perf_counter() - started

    rounds = []
    for round_index in range(spec.rounds):
        round_started = time.perf_counter()
        sampled = sample_clients(spec, round_index)
        inits = {client: method.client_init(client, client_ranks[client]) for client in sampled}
        results = [
            bench.train(
                inits[client],
                split.train.subset(shards[client]),
                spec.train,
                head=head,
                seed=client_seed(spec, round_index, client),
            )
            for client in sampled
        ]
        method.aggregate(result.update for result in results)
        examples = sum(result.update.num_examples for result in results)
        # The aggregation actor's head: averaged by data size over the clients that sent one.
        heads = [(result.update.num_examples, result.head) for result in results if result.head is not None]
        if heads:
            head = {name: sum(n * trained[name] for n, trained in heads) / examples for name in heads[0][1]}
        metrics = bench.evaluate(
            method.global_delta(), eval_set, spec.eval, max_seq_len=spec.train.max_seq_len, head=head
        )
        rounds.append(
            RoundTiming(
                round=round_index,
                round_s=time.perf_counter() - round_started,
                train_loss=sum(r.metrics["train_loss"] * r.update.num_examples for r in results) / examples,
                eval_metric=metrics[metric],
                client_s_p50=statistics.median(r.metrics["seconds"] for r in results),
            )
        )
        print(f"bare   round {round_index}: {rounds[-1].round_s:.2f} s", flush=True)
    return Side("bare", rounds, setup_s, time.perf_counter() - started)


def fedray_run(spec: Spec, cores: int) -> Side:
    """``spec`` through fedray's ``run`` on a Ray of this machine's cores; per-round wall times from MLflow."""
    metric = metric_name(spec)
    with tempfile.TemporaryDirectory(prefix="fedray-overhead-") as work_dir:
        tracking_uri = f"sqlite:///{Path(work_dir) / 'mlflow.db'}"
        started = time.perf_counter()
        with local_ray(num_cpus=cores) as ray_start_s:
            summary = run(spec, run_dir=Path(work_dir) / "run", tracking_uri=tracking_uri, progress=False)
        total_s = time.perf_counter() - started
        history = MlflowClient(tracking_uri).get_metric_history(summary.run_id, "round_s")
    logged_ms = {entry.step: entry.timestamp for entry in history}
    rounds = []
    for record in summary.rounds:
        index = record["round"]
        wall_s = (logged_ms[index] - logged_ms[index - 1]) / MS_PER_S if index > 0 else None
        timing = RoundTiming(
            index, record["round_s"], record["train_loss"], record[metric], record["client_s_p50"], wall_s
        )
        rounds.append(timing)
        print(f"fedray round {index}: {record['round_s']:.2f} s", flush=True)
    builds = [worker["builds"] for worker in summary.worker_builds.values()]
    return Side("fedray", rounds, ray_start_s, total_s, workers=len(builds), max_builds=max(builds))


def same_work(bare: Side, fedray: Side) -> float:
    """The largest relative difference between the two sides' train losses over the rounds."""
    return max(
        abs(ours.train_loss - theirs.train_loss) / max(abs(theirs.train_loss), 1e-12)
        for ours, theirs in zip(fedray.rounds, bare.rounds, strict=True)
    )


def rounds_table(bare: Side, fedray: Side) -> str:
    header = [
        "round",
        "bare s",
        "fedray round_s",
        "fedray wall s",
        "wall / bare",
        "client s p50 bare",
        "client s p50 fedray",
        "train loss bare",
        "train loss fedray",
        "eval bare",
        "eval fedray",
    ]
    rows = []
    for ours, theirs in zip(fedray.rounds, bare.rounds, strict=True):
        wall = "-" if ours.wall_s is None else f"{ours.wall_s:.2f}"
        ratio = "-" if ours.wall_s is None else f"{ours.wall_s / theirs.round_s:.3f}"
        rows.append(
            [
                ours.round,
                f"{theirs.round_s:.2f}",
                f"{ours.round_s:.2f}",
                wall,
                ratio,
                f"{theirs.client_s_p50:.2f}",
                f"{ours.client_s_p50:.2f}",
                f"{theirs.train_loss:.6f}",
                f"{ours.train_loss:.6f}",
                f"{theirs.eval_metric:.4f}",
                f"{ours.eval_metric:.4f}",
            ]
        )
    return markdown_table(header, rows)


def sides_table(bare: Side, fedray: Side) -> str:
    last = len(bare.rounds) - 1
    header = ["side", "set-up s", "round 0 s", f"rounds 1..{last} s", "whole run s"]
    rows = [
        ["bare", f"{bare.setup_s:.2f} (data, model)", f"{bare.rounds[0].round_s:.2f}", f"{bare.measured_s():.2f}"],
        [
            "fedray",
            f"{fedray.setup_s:.2f} (Ray start)",
            f"{fedray.rounds[0].round_s:.2f} (round_s)",
            f"{fedray.measured_s():.2f} (wall)",
        ],
    ]
    return markdown_table(
        header, [[*row, f"{side.total_s:.2f}"] for row, side in zip(rows, (bare, fedray), strict=True)]
    )


def _mean_and_error(values: Sequence[float], what: str) -> str:
    """``mean ± standard error`` of ratios: how far the noise between ``what`` moves the mean."""
    if len(values) < 2:
        return f"mean {values[0]:.3f} (one {what[:-1]}: no spread)"
    error = statistics.stdev(values) / len(values) ** 0.5
    return f"mean {statistics.fmean(values):.3f} ± {error:.3f} (standard error over {len(values)} {what})"


@dataclass
class Pair:
    """One bare run and the fedray run right after it: one ratio, as the machine's speed drifts over minutes."""

    bare: Side
    fedray: Side

    @property
    def ratio_wall(self) -> float:
        return self.fedray.measured_s() / self.bare.measured_s()

    @property
    def ratio_round_s(self) -> float:
        return sum(t.round_s for t in self.fedray.rounds[1:]) / self.bare.measured_s()

    def per_round(self) -> list[float]:
        return [
            ours.wall_s / theirs.round_s
            for ours, theirs in zip(self.fedray.rounds[1:], self.bare.rounds[1:], strict=True)
        ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help=f"spec overrides (key=value) on top of {SPEC_FILE}")
    parser.add_argument(
        "--cores", type=int, help="cores (torch threads, Ray CPUs) for the client work; default every core"
    )
    parser.add_argument(
        "--pairs", type=int, help=f"bare-then-fedray pairs of runs (default {FULL_PAIRS}; 1 with --smoke)"
    )
    add_common_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = start("overhead", argv, args.smoke)
    cores = args.cores or core_count()
    if not 1 <= cores <= core_count():
        raise SystemExit(f"--cores {cores}: this machine has {core_count()}; give 1 to {core_count()}")
    num_pairs = args.pairs or (1 if args.smoke else FULL_PAIRS)
    if num_pairs < 1:
        raise SystemExit(f"--pairs {num_pairs}: give at least 1")
    overrides = [
        *COMMON_OVERRIDES,
        *(SMOKE_OVERRIDES if args.smoke else FULL_OVERRIDES),
        f"resources.num_cpus={cores}",
        *args.overrides,
    ]
    spec = bench_spec(SPEC_FILE, overrides)
    if spec.rounds < 2:
        raise SystemExit(f"rounds={spec.rounds}: at least 2 are needed (round 0 is left out of the ratio)")

    pairs = []
    for index in range(num_pairs):
        print(f"pair {index + 1} of {num_pairs}", flush=True)
        pairs.append(Pair(bare_loop(spec), fedray_run(spec, cores)))

    # Pooled: all fedray time over all bare time, so longer (slower) pairs weigh more, as time does.
    ratio = sum(pair.fedray.measured_s() for pair in pairs) / sum(pair.bare.measured_s() for pair in pairs)
    round_s_ratio = sum(sum(t.round_s for t in pair.fedray.rounds[1:]) for pair in pairs) / sum(
        pair.bare.measured_s() for pair in pairs
    )
    per_pair = [pair.ratio_wall for pair in pairs]
    per_round = [value for pair in pairs for value in pair.per_round()]
    loss_gap = max(same_work(pair.bare, pair.fedray) for pair in pairs)
    met = "met" if ratio <= 1 + TARGET_OVERHEAD else "MISSED"
    threads = torch.get_num_threads()
    report.sections.append(
        f"Setting: `{SPEC_FILE}` ({spec.model}, {spec.dataset}, {spec.method}) with {' '.join(overrides)}: "
        f"{spec.rounds} rounds of {spec.sampled_clients} clients, {spec.train.local_steps} local steps each, "
        f"evaluation of {spec.eval.max_examples} examples every round; one client at a time with {threads} torch "
        f"threads on both sides. {num_pairs} pair(s) of runs, each the bare loop and then fedray."
    )
    for index, pair in enumerate(pairs):
        report.sections += [
            f"Pair {index + 1}: fedray / bare {pair.ratio_wall:.3f} by wall time, {pair.ratio_round_s:.3f} by round_s.",
            rounds_table(pair.bare, pair.fedray),
            sides_table(pair.bare, pair.fedray),
        ]
    report.sections.append(
        f"fedray / bare over rounds 1..{spec.rounds - 1} of {num_pairs} pair(s): {ratio:.3f} by wall time "
        f"(checkpoints and MLflow included), {round_s_ratio:.3f} by round_s; per pair "
        f"{', '.join(f'{value:.3f}' for value in per_pair)}, {_mean_and_error(per_pair, 'pairs')}; per round (wall) "
        f"median {statistics.median(per_round):.3f}. Target <= {1 + TARGET_OVERHEAD:.2f}: {met}. Train losses of "
        f"the two sides agree to {loss_gap:.1e} (relative): "
        f"{'the same work' if loss_gap <= SAME_LOSS_RTOL else 'NOT the same work'}. fedray's client tasks ran in "
        f"{max(pair.fedray.workers for pair in pairs)} worker process(es) at most, each building the base model at "
        f"most {max(pair.fedray.max_builds for pair in pairs)} time(s)."
    )
    report.results = {
        "spec_file": SPEC_FILE,
        "overrides": overrides,
        "torch_threads": threads,
        "ratio_wall": ratio,
        "ratio_round_s": round_s_ratio,
        "ratio_per_pair": per_pair,
        "ratio_per_round": per_round,
        "target_ratio": 1 + TARGET_OVERHEAD,
        "target_met": ratio <= 1 + TARGET_OVERHEAD,
        "train_loss_max_rel_diff": loss_gap,
        "same_work": loss_gap <= SAME_LOSS_RTOL,
        "pairs": [{"bare": asdict(pair.bare), "fedray": asdict(pair.fedray)} for pair in pairs],
    }
    finish(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
