"""Memory: peak resident memory of the whole Ray cluster with k = 1, 2, 4 concurrent clients.

The whole cluster is this driver and every process it started (GCS, raylet with its
object store, agents, workers), and its memory is the sum of their PSS
(``psutil.Process.memory_full_info().pss``): a page shared by n processes counts 1/n in
each, so the object store's one copy of the base, mapped by every worker, counts once.
(RSS would count it once per worker.) A background thread samples the sum every 0.2 s.

Two variants of the same client round (same clients, starts, shards, seeds):

- ``shared``: fedray's own ``train_task`` over the one object-store copy of the base.
- ``naive``: a benchmark-only task that first copies the base out of the object store
  into its own memory, then does the same client round on that private copy: what every
  worker holds when nothing is shared (as when weights reach it as torch tensors).

Each variant runs in a Ray cluster of its own, started here with the base once in its
object store, and in it k = 1, 2, 4 in turn: k workers are warmed up together (fedray
imported; for ``shared`` the workbench built), then k client tasks run at once with
``num_cpus`` = cores / k. Workers stay from one k to the next, as they stay from round to
round in a fedray run, so the k busy workers of a setting are the previous setting's plus
new ones. The per-client working set is ``(total(k) - total(1)) / (k - 1)``: what one more
concurrent client adds. With the base shared it holds no copy of the base; with private
copies it holds one, so the two differ by about the base's bytes.

    .venv/bin/python benchmarks/system/memory.py                       # SmolLM2-135M, k = 1, 2, 4
    .venv/bin/python benchmarks/system/memory.py --smoke               # MiniLM, k = 1, 2 (CI)
    .venv/bin/python benchmarks/system/memory.py --model minilm --out memory.md
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import psutil
import ray

# The PSS of a process tree is read the same way as the Flower comparison reads it.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "peers"))
from harness import (
    BYTES_PER_MIB,
    Clients,
    add_common_arguments,
    bench_spec,
    client_status,
    core_count,
    finish,
    local_ray,
    markdown_table,
    prepare_clients,
    start,
    warm_workers,
    with_resources,
)
from pss import tree_pss

from fedray import inputs
from fedray.config import Spec
from fedray.methods import ClientInit
from fedray.models import SharedBase
from fedray.worker import tasks
from fedray.worker.workbench import Workbench

#: Spec file and overrides per model: a short client round with real activations.
MODEL_SPECS = {
    "smollm2-135m": (
        "jobs/smollm2_titles.yaml",
        # bbc_titles has 5 topics, the by_key partition's most clients.
        ("num_clients=5", "train.local_steps=3", "train.batch_size=2", "train.max_seq_len=64"),
    ),
    "minilm": ("jobs/quickstart.yaml", ("train.local_steps=4", "train.batch_size=16", "train.max_seq_len=32")),
}
DEFAULT_MODEL = "smollm2-135m"
#: Concurrent clients measured, full size and --smoke.
FULL_CONCURRENT = (1, 2, 4)
SMOKE_CONCURRENT = (1, 2)
SMOKE_MODEL = "minilm"
# Steps stay at 4: a task must outlast a few 0.2 s samples for the sampler to see k at once.
SMOKE_OVERRIDES = ("train.batch_size=8", "train.max_seq_len=24")
VARIANTS = ("shared", "naive")
#: How often the background thread sums the cluster's PSS.
SAMPLE_INTERVAL_S = 0.2
#: Time before each setting's warm-up over which the idle cluster's memory is read.
IDLE_S = 1.0
#: Process titles of Ray's per-node agents (children of the raylet that are not workers).
AGENT_TITLES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
#: Titles of a worker process while it runs a client round (Ray titles a worker with its task).
CLIENT_TASK_TITLES = ("ray::train_task", "ray::naive_client")
#: What a worker process runs before it sets its title.
WORKER_SCRIPT = "default_worker.py"


@dataclass
class Sample:
    """One reading of the cluster's memory (bytes of PSS) and of the workers running a client round."""

    total: int
    driver: int
    workers: int
    busy_workers: int


@dataclass
class ClusterMemory:
    """Samples the summed PSS of this process and all its descendants in a background thread."""

    interval_s: float = SAMPLE_INTERVAL_S
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def read(self) -> Sample:
        driver = psutil.Process()
        sizes = tree_pss(driver)
        total = sum(pss for _, pss in sizes.values())
        workers = busy = 0
        for label, pss in sizes.values():
            titled_worker = label.startswith("ray::") and not label.startswith(AGENT_TITLES)
            if titled_worker or WORKER_SCRIPT in label:
                workers += pss
                busy += label.startswith(CLIENT_TASK_TITLES)
        return Sample(total, sizes.get(driver.pid, ("", 0))[1], workers, busy)

    def __enter__(self) -> ClusterMemory:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.read())
            self._stop.wait(self.interval_s)

    def peak(self) -> Sample:
        return max(self.samples, key=lambda sample: sample.total)


@ray.remote(max_calls=0)
def naive_client(shared_box: list, init: ClientInit, indices, spec: Spec, head, seed: int) -> int:
    """fedray's client round on this worker's own copy of the base (copied out of the object store)."""
    tasks.set_threads(spec)
    shared: SharedBase = ray.get(shared_box[0])
    own = dataclasses.replace(shared, arrays={key: array.copy() for key, array in shared.arrays.items()})
    del shared  # from here on, only the private copy
    bench = Workbench(own)
    bench.train(init, inputs.dataset_split(spec).train.subset(indices), spec.train, head=head, seed=seed)
    return os.getpid()


def measure(variant: str, concurrent: int, clients: Clients, shared_box: list, spec: Spec, cores: int) -> dict:
    """Peak memory of the cluster while ``concurrent`` client tasks of ``variant`` run at once."""
    spec = with_resources(spec, cores / concurrent)
    run_key = f"bench-memory-{variant}-{os.getpid()}"
    with ClusterMemory() as memory:
        time.sleep(IDLE_S)
        idle = min(sample.total for sample in memory.samples)
        started = time.perf_counter()
        warm_workers(run_key, shared_box if variant == "shared" else None, spec, concurrent)
        warm_up_s = time.perf_counter() - started
        options = {"num_cpus": spec.resources.num_cpus}
        pending = []
        for slot in range(concurrent):
            args = (clients.inits[slot], clients.shards[slot], spec, clients.head, clients.seeds[slot])
            if variant == "shared":
                pending.append(tasks.train_task.options(**options).remote(run_key, shared_box, *args))
            else:
                pending.append(naive_client.options(**options).remote(shared_box, *args))
        wait = client_status if variant == "shared" else ray.get
        for task in pending:
            wait(task)
        clients_s = time.perf_counter() - started - warm_up_s
    peak = memory.peak()
    return {
        "variant": variant,
        "k": concurrent,
        "num_cpus_per_task": spec.resources.num_cpus,
        "idle_total_bytes": idle,
        "peak_total_bytes": peak.total,
        "peak_driver_bytes": peak.driver,
        "peak_workers_bytes": peak.workers,
        "busy_workers_at_peak": peak.busy_workers,
        "most_busy_workers": max(sample.busy_workers for sample in memory.samples),
        "samples": len(memory.samples),
        "warm_up_s": warm_up_s,
        "clients_s": clients_s,
    }


def working_sets(settings: list[dict]) -> dict[str, dict[int, float]]:
    """Per variant and k > 1: (total(k) - total(1)) / (k - 1), in bytes."""
    slopes: dict[str, dict[int, float]] = {}
    for variant in VARIANTS:
        totals = {s["k"]: s["peak_total_bytes"] for s in settings if s["variant"] == variant}
        slopes[variant] = {k: (total - totals[1]) / (k - 1) for k, total in totals.items() if k > 1}
    return slopes


def mib(value: float) -> str:
    return f"{value / BYTES_PER_MIB:.0f}"


def settings_table(settings: list[dict], slopes: dict[str, dict[int, float]]) -> str:
    header = [
        "variant",
        "k",
        "num_cpus / task",
        "idle MiB",
        "peak MiB",
        "driver MiB at peak",
        "workers MiB at peak",
        "busy workers at peak",
        "most busy at once",
        "per-client working set MiB",
    ]
    rows = [
        [
            setting["variant"],
            setting["k"],
            f"{setting['num_cpus_per_task']:g}",
            mib(setting["idle_total_bytes"]),
            mib(setting["peak_total_bytes"]),
            mib(setting["peak_driver_bytes"]),
            mib(setting["peak_workers_bytes"]),
            setting["busy_workers_at_peak"],
            setting["most_busy_workers"],
            mib(slopes[setting["variant"]][setting["k"]]) if setting["k"] > 1 else "-",
        ]
        for setting in settings
    ]
    return markdown_table(header, rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", choices=list(MODEL_SPECS), help=f"default {DEFAULT_MODEL} ({SMOKE_MODEL} with --smoke)"
    )
    parser.add_argument("--concurrent", type=int, nargs="+", help=f"values of k (default {FULL_CONCURRENT}); needs 1")
    parser.add_argument("overrides", nargs="*", help="spec overrides (key=value) on top of the model's spec file")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.concurrent is not None and (1 not in args.concurrent or min(args.concurrent) < 1):
        parser.error(f"--concurrent must include 1 and only positive values, got {args.concurrent}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = start("memory", argv, args.smoke)
    cores = core_count()
    model = args.model or (SMOKE_MODEL if args.smoke else DEFAULT_MODEL)
    concurrent = sorted(set(args.concurrent or (SMOKE_CONCURRENT if args.smoke else FULL_CONCURRENT)))
    spec_file, model_overrides = MODEL_SPECS[model]
    overrides = [*model_overrides, *(SMOKE_OVERRIDES if args.smoke else ()), "name=bench-memory", *args.overrides]
    spec = bench_spec(spec_file, overrides)
    clients = prepare_clients(spec, max(concurrent))
    base_bytes = clients.base.nbytes()

    settings = []
    ray_start_s = {}
    for variant in VARIANTS:
        with local_ray(num_cpus=cores) as startup_s:
            print(f"Ray for {variant} started in {startup_s:.1f} s", flush=True)
            ray_start_s[variant] = startup_s
            shared_box = [ray.put(clients.base)]
            for k in concurrent:
                settings.append(measure(variant, k, clients, shared_box, spec, cores))
                setting = settings[-1]
                print(
                    f"{variant:>6}, k = {k}: cluster peak {mib(setting['peak_total_bytes'])} MiB, at most "
                    f"{setting['most_busy_workers']} busy workers at once (warm-up {setting['warm_up_s']:.1f} s, "
                    f"clients {setting['clients_s']:.1f} s)",
                    flush=True,
                )

    slopes = working_sets(settings)
    report.sections += [
        f"Setting: `{spec_file}` ({model}, {spec.dataset}, {spec.method}) with {' '.join(overrides)}. "
        f"Base model: {mib(base_bytes)} MiB (SharedBase.nbytes). A Ray cluster per variant, k in turn (workers "
        f"stay). MiB = 2^20 bytes of PSS, summed over the driver and every process of its Ray cluster, sampled every "
        f"{SAMPLE_INTERVAL_S} s; 'idle' is the cluster just before the setting's warm-up.",
        settings_table(settings, slopes),
    ]
    results = {
        "model": model,
        "spec_file": spec_file,
        "overrides": overrides,
        "base_bytes": base_bytes,
        "ray_start_s": ray_start_s,
        "settings": settings,
        "working_set_bytes": {variant: {str(k): v for k, v in by_k.items()} for variant, by_k in slopes.items()},
    }
    k_max = max(concurrent)
    if k_max > 1:
        shared, naive = slopes["shared"][k_max], slopes["naive"][k_max]
        # A naive client holds one private copy of the base; the rest of its working set is a
        # shared client's. So the difference, in bases, is the copies sharing saves per client.
        copies_saved = (naive - shared) / base_bytes
        report.sections.append(
            f"Per-client working set at k = {k_max}: shared {mib(shared)} MiB, naive {mib(naive)} MiB. The "
            f"difference is {copies_saved:.2f} x the base ({mib(base_bytes)} MiB): each naive client holds one "
            f"copy of the base that a shared one does not. A shared client adds {shared / base_bytes:.2f} x the "
            "base's bytes (its process, workbench and training state)."
        )
        results |= {"base_copies_saved_per_client": copies_saved, "shared_working_set_over_base": shared / base_bytes}
    report.results = results
    finish(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
