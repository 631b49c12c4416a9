"""Concurrency: client throughput with 1 vs 2 concurrent client tasks, and fake fractional GPUs.

Throughput. The same client rounds (same clients, starts, shards and seeds; no
aggregation) run as fedray's own ``train_task`` on a Ray started here, once with one
task at a time (``num_cpus`` = all cores, so as many torch threads) and once with two at
a time (half the cores and threads each), as fedray schedules them from
``resources.num_cpus``. Throughput = client rounds per second of wall time over the
whole batch; the workers are warmed first (each has built its workbench), so start-up
is excluded.

Fake fractional GPUs. Ray is started with one fake GPU (CPU torch: nothing runs on it);
for k = 1, 2, 4, 2k client tasks ask for ``num_gpus = 1/k`` and a small ``num_cpus``
(so the GPU, not the CPUs, limits them). Each task records its own start and end time;
the largest number of tasks running at one instant must be k.

    .venv/bin/python benchmarks/system/concurrency.py                 # full size
    .venv/bin/python benchmarks/system/concurrency.py --smoke         # under a minute (CI)
    .venv/bin/python benchmarks/system/concurrency.py --client-rounds 16 --out concurrency.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence

import ray
from harness import (
    Clients,
    add_common_arguments,
    bench_spec,
    client_status,
    core_count,
    finish,
    local_ray,
    markdown_table,
    max_overlap,
    prepare_clients,
    start,
    task_resources,
    warm_workers,
    with_resources,
)

from fedray.config import Spec
from fedray.methods import ClientInit
from fedray.worker import tasks

SPEC_FILE = "jobs/quickstart.yaml"
#: Concurrent client tasks compared for throughput; each gets cores / level CPUs (and torch threads).
LEVELS = (1, 2)
#: Fake-GPU settings: k tasks share the one GPU (num_gpus = 1 / k).
GPU_SHARES = (1, 2, 4)
#: CPUs each fake-GPU task asks for: small, so that the GPU share alone limits how many run at once.
GPU_TASK_CPUS = 0.25
#: Fake-GPU tasks launched per setting, as a multiple of k: more than fit at once.
GPU_TASKS_PER_SLOT = 2
#: The training budget of one client round, full size and --smoke.
FULL_OVERRIDES = ("train.local_steps=12",)
SMOKE_OVERRIDES = (
    "num_clients=8",
    "partition=iid",
    "partition_options={}",
    "dataset_options.max_examples=400",
    "train.local_steps=2",
    "train.batch_size=8",
    "train.max_seq_len=24",
)
#: Client rounds per throughput measurement, full size and --smoke.
FULL_CLIENT_ROUNDS = 8
SMOKE_CLIENT_ROUNDS = 4


@ray.remote(max_calls=0)
def timed_client(
    run_key: str, shared_box: list, init: ClientInit, indices, spec: Spec, head, seed: int
) -> tuple[int, float, float]:
    """fedray's client round (``client_round``, what ``train_task`` runs) between two clock
    readings: (pid, start, end)."""
    started = time.time()
    tasks.client_round(run_key, shared_box, init, indices, spec, head, seed)
    return os.getpid(), started, time.time()


def throughput(run_key: str, shared_box: list, clients: Clients, spec: Spec, level: int, cores: int) -> dict:
    """Every client round of ``clients`` through fedray's ``train_task``, ``level`` at a time."""
    spec = with_resources(spec, cores / level)
    started = time.perf_counter()
    launched = [
        tasks.train_task.options(**task_resources(spec)).remote(
            run_key, shared_box, init, clients.shards[slot], spec, clients.head, clients.seeds[slot]
        )
        for slot, init in enumerate(clients.inits)
    ]
    done = [client_status(task) for task in launched]
    wall_s = time.perf_counter() - started
    return {
        "level": level,
        "num_cpus_per_task": cores / level,
        "torch_threads": spec.resources.torch_threads or max(1, int(spec.resources.num_cpus)),
        "client_rounds": len(done),
        "wall_s": wall_s,
        "client_rounds_per_s": len(done) / wall_s,
        "client_s_median": statistics.median(status["seconds"] for status in done),
        "workers": len({status["pid"] for status in done}),
        "max_builds_per_worker": max(status["builds"] for status in done),
    }


def gpu_overlap(run_key: str, shared_box: list, clients: Clients, spec: Spec, share: int) -> dict:
    """2k client tasks at ``num_gpus = 1/k``; the most that ran at one instant, by their own clocks."""
    spec = with_resources(spec, GPU_TASK_CPUS, 1.0 / share)
    launched = GPU_TASKS_PER_SLOT * share
    slots = [index % len(clients.inits) for index in range(launched)]
    spans = ray.get(
        [
            timed_client.options(**task_resources(spec)).remote(
                run_key, shared_box, clients.inits[slot], clients.shards[slot], spec, clients.head, clients.seeds[slot]
            )
            for slot in slots
        ]
    )
    overlap = max_overlap((begin, end) for _, begin, end in spans)
    return {
        "k": share,
        "num_gpus_per_task": 1.0 / share,
        "num_cpus_per_task": GPU_TASK_CPUS,
        "tasks": launched,
        "max_concurrent": overlap,
        "as_requested": overlap == share,
        "task_s_median": statistics.median(end - begin for _, begin, end in spans),
        "workers": len({pid for pid, _, _ in spans}),
    }


def throughput_table(levels: list[dict]) -> str:
    header = [
        "concurrent tasks",
        "num_cpus / task",
        "torch threads",
        "client rounds",
        "wall s",
        "client rounds / s",
        "client s (median)",
        "workers",
        "builds / worker",
    ]
    rows = [
        [
            level["level"],
            f"{level['num_cpus_per_task']:g}",
            level["torch_threads"],
            level["client_rounds"],
            f"{level['wall_s']:.2f}",
            f"{level['client_rounds_per_s']:.3f}",
            f"{level['client_s_median']:.2f}",
            level["workers"],
            level["max_builds_per_worker"],
        ]
        for level in levels
    ]
    return markdown_table(header, rows)


def gpu_table(shares: list[dict]) -> str:
    header = ["k", "num_gpus / task", "tasks", "most at once", "= k", "task s (median)", "workers"]
    rows = [
        [
            share["k"],
            f"{share['num_gpus_per_task']:g}",
            share["tasks"],
            share["max_concurrent"],
            "yes" if share["as_requested"] else "NO",
            f"{share['task_s_median']:.2f}",
            share["workers"],
        ]
        for share in shares
    ]
    return markdown_table(header, rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--client-rounds", type=int, help=f"client rounds per setting (default {FULL_CLIENT_ROUNDS})")
    parser.add_argument("overrides", nargs="*", help=f"spec overrides (key=value) on top of {SPEC_FILE}")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.client_rounds is not None and args.client_rounds < 1:
        parser.error(f"--client-rounds must be at least 1, got {args.client_rounds}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = start("concurrency", argv, args.smoke)
    cores = core_count()
    if cores / GPU_TASK_CPUS < max(GPU_SHARES):
        raise SystemExit(f"{cores} cores cannot hold {max(GPU_SHARES)} tasks of {GPU_TASK_CPUS} CPUs each")
    overrides = [*(SMOKE_OVERRIDES if args.smoke else FULL_OVERRIDES), "name=bench-concurrency", *args.overrides]
    spec = bench_spec(SPEC_FILE, overrides)
    count = args.client_rounds or (SMOKE_CLIENT_ROUNDS if args.smoke else FULL_CLIENT_ROUNDS)
    clients = prepare_clients(spec, count)
    run_key = f"bench-concurrency-{os.getpid()}"

    with local_ray(num_cpus=cores, num_gpus=1) as ray_start_s:
        print(f"Ray started in {ray_start_s:.1f} s", flush=True)
        shared_box = [ray.put(clients.base)]
        # Largest setting first: Ray ends idle workers beyond a soft limit (by default the
        # node's CPU count) after about a second, so a smaller setting after a larger one
        # still finds warm workers, while a larger one after a smaller one would wait for cold ones.
        most_shares = max(GPU_SHARES)
        warm_workers(run_key, shared_box, with_resources(spec, GPU_TASK_CPUS, 1.0 / most_shares), most_shares)
        shares = []
        for share in sorted(GPU_SHARES, reverse=True):
            shares.insert(0, gpu_overlap(run_key, shared_box, clients, spec, share))
            print(f"num_gpus=1/{share}: at most {shares[0]['max_concurrent']} at once", flush=True)
        warm_workers(run_key, shared_box, with_resources(spec, cores / max(LEVELS)), max(LEVELS))
        levels = []
        for level in sorted(LEVELS, reverse=True):
            levels.insert(0, throughput(run_key, shared_box, clients, spec, level, cores))
            print(f"{level} at a time: {levels[0]['client_rounds_per_s']:.3f} client rounds/s", flush=True)

    speedup = levels[-1]["client_rounds_per_s"] / levels[0]["client_rounds_per_s"]
    report.sections += [
        f"Setting: `{SPEC_FILE}` ({spec.model}, {spec.dataset}, {spec.method}) with {' '.join(overrides)}; "
        f"{count} client rounds (clients 0..{count - 1}, round 0) per setting, the same in each; warm workers. "
        f"Ray started in {ray_start_s:.1f} s (excluded).",
        throughput_table(levels),
        f"Throughput with {LEVELS[-1]} concurrent tasks / with {LEVELS[0]}: {speedup:.2f}.",
        f"Fake fractional GPUs: Ray with one GPU; 2k tasks of num_gpus = 1/k and num_cpus = {GPU_TASK_CPUS} "
        f"({cores / GPU_TASK_CPUS:g} would fit by CPUs alone). Most tasks running at one instant, from the tasks' "
        "own start and end times:",
        gpu_table(shares),
    ]
    report.results = {
        "spec_file": SPEC_FILE,
        "overrides": overrides,
        "ray_start_s": ray_start_s,
        "throughput": levels,
        "speedup": speedup,
        "fake_gpu": shares,
        "fake_gpu_as_requested": all(share["as_requested"] for share in shares),
    }
    finish(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
