"""Orchestration per client task: what fedray's round costs beyond its clients' own work.

A run with many tiny clients (1,000 clients, 100 a round, one local step of 4 examples):
per round, the wall time the driver measures (``round_s``, from sampling to the last
client's update aggregated) minus the clients' own training time spread over the slots
that run at once (``client_s_sum / slots``), divided by the round's clients. What is left
per client is fedray's: launching the task, shipping its start and shard, the worker's
bookkeeping, handing the update to the aggregation actor and aggregating it. Round 0
(worker start-up) and the last round (the only evaluation) are left out. The driver's
resident memory is read after the run, to compare runs with different numbers of clients.

    .venv/bin/python benchmarks/system/per_client.py                    # 1,000 clients, 100 a round
    .venv/bin/python benchmarks/system/per_client.py num_clients=200    # another population, same rounds
    .venv/bin/python benchmarks/system/per_client.py --smoke            # tiny sizes (CI)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
from harness import (
    BYTES_PER_MIB,
    add_common_arguments,
    bench_spec,
    core_count,
    finish,
    local_ray,
    markdown_table,
    start,
)

from fedray.driver.lifecycle import run

SPEC_FILE = "jobs/quickstart.yaml"
#: The issue's target: at most this many milliseconds of fedray per client task.
TARGET_MS = 10.0
MS_PER_S = 1000.0
COMMON_OVERRIDES = (
    "name=bench-per-client",
    "partition=iid",
    "partition_options={}",
    "train.local_steps=1",
    "train.batch_size=4",
    "train.max_seq_len=16",
    "resources.num_cpus=1",
    "eval.max_examples=16",
)
FULL_OVERRIDES = ("num_clients=1000", "clients_per_round=100", "rounds=6", "eval.every=6")
SMOKE_OVERRIDES = ("num_clients=40", "clients_per_round=8", "rounds=3", "eval.every=3")


def measure(overrides: Sequence[str]) -> dict:
    """One run; per measured round its wall time, its clients' summed time and what is left per client."""
    spec = bench_spec(SPEC_FILE, overrides)
    if spec.rounds < 3:
        raise SystemExit(f"rounds={spec.rounds}: at least 3 are needed (the first and the last are left out)")
    cores = core_count()
    slots = min(spec.sampled_clients, int(cores / spec.resources.num_cpus))
    with tempfile.TemporaryDirectory() as work_dir:
        started = time.perf_counter()
        with local_ray(num_cpus=cores):
            run(spec, run_dir=Path(work_dir) / "run", tracking_uri=f"sqlite:///{work_dir}/mlflow.db", progress=False)
        total_s = time.perf_counter() - started
        records = [json.loads(line) for line in (Path(work_dir) / "run" / "metrics.jsonl").read_text().splitlines()]
    rounds = []
    for record in records[1:-1]:
        own_s = record["client_s_sum"] / slots
        rounds.append(
            {
                "round": record["round"],
                "clients": len(record["clients"]),
                "round_s": record["round_s"],
                "client_s_sum": record["client_s_sum"],
                "per_client_ms": (record["round_s"] - own_s) / len(record["clients"]) * MS_PER_S,
            }
        )
    return {
        "num_clients": spec.num_clients,
        "clients_per_round": spec.sampled_clients,
        "slots": slots,
        "total_s": total_s,
        "driver_rss_mib": psutil.Process().memory_info().rss / BYTES_PER_MIB,
        "rounds": rounds,
        "per_client_ms": statistics.median(r["per_client_ms"] for r in rounds),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help=f"spec overrides (key=value) on top of {SPEC_FILE}")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    report = start("per_client", argv, args.smoke)
    result = measure([*COMMON_OVERRIDES, *(SMOKE_OVERRIDES if args.smoke else FULL_OVERRIDES), *args.overrides])
    rows = [
        [r["round"], r["clients"], f"{r['round_s']:.2f}", f"{r['client_s_sum']:.2f}", f"{r['per_client_ms']:.1f}"]
        for r in result["rounds"]
    ]
    report.sections += [
        f"{result['num_clients']} clients, {result['clients_per_round']} a round, {result['slots']} at once "
        f"(one CPU each); the whole run took {result['total_s']:.0f} s, the driver ends at "
        f"{result['driver_rss_mib']:.0f} MiB resident.",
        markdown_table(
            ["round", "clients", "round_s", "clients' own s (sum)", "fedray ms per client"],
            rows,
        ),
        f"**fedray per client task: {result['per_client_ms']:.1f} ms** (median over the rounds; "
        f"round_s minus the clients' own time over {result['slots']} slots, per client). Target: <= {TARGET_MS} ms.",
    ]
    report.results = result | {"target_ms": TARGET_MS}
    finish(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
