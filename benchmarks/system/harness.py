"""What the system benchmarks share: the machine description, a private local Ray, reports.

Every script in this folder prints the machine it runs on (cores, CPU model, memory,
torch and Ray versions, load average before and after) and its results as markdown;
with ``--out FILE`` it also writes that markdown to FILE and the same numbers as JSON to
FILE with the suffix ``.json``. The scripts import this module by name: Ray puts the
script's folder on its workers' ``sys.path`` too, so tasks defined here unpickle there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import ray
import torch
from start_line import StartLine

from fedray import inputs
from fedray.config import Spec, load_spec
from fedray.driver.cluster import task_resources
from fedray.driver.prepare import Prepared, prepare
from fedray.driver.sampling import client_seed
from fedray.methods import ClientInit, Method, create_method
from fedray.models import Base, SharedBase, export_base, head_state, target_layers
from fedray.worker import tasks

#: The repository root: spec files are named relative to it.
REPO = Path(__file__).resolve().parents[2]
BYTES_PER_MB = 1e6
BYTES_PER_MIB = 2**20
#: Object store of a benchmark's Ray: the largest base (SmolLM2-135M, 540 MB) once, plus factors.
OBJECT_STORE_BYTES = 1 << 30
#: Environment of a benchmark's Ray: no usage reports, and the plain auth mode the tests use.
RAY_ENVIRONMENT = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
#: How long a warm-up task waits for the others to start before giving up.
WARM_UP_TIMEOUT_S = 300.0
#: How often a warm-up task looks whether all of them have started.
WARM_UP_POLL_S = 0.05


def core_count() -> int:
    """Cores this process may run on (what nproc prints)."""
    return len(os.sched_getaffinity(0))


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


@dataclass
class Machine:
    """The machine a benchmark ran on, and how busy it was before and after."""

    cores: int
    cpu_model: str
    memory_gib: float
    torch: str
    ray: str
    python: str
    #: 1-minute load average when the benchmark started and when it ended: timings are
    #: comparable only between runs at a low load (other work shares the cores).
    load_before: float
    load_after: float | None = None

    @classmethod
    def now(cls) -> Machine:
        return cls(
            cores=core_count(),
            cpu_model=cpu_model(),
            memory_gib=psutil.virtual_memory().total / 2**30,
            torch=torch.__version__,
            ray=ray.__version__,
            python=platform.python_version(),
            load_before=os.getloadavg()[0],
        )

    def describe(self) -> str:
        return (
            f"{self.cores} cores (nproc), {self.cpu_model}, {self.memory_gib:.1f} GiB, torch {self.torch}, "
            f"ray {self.ray}, Python {self.python}"
        )

    def load_line(self) -> str:
        after = "still running" if self.load_after is None else f"{self.load_after:.2f} after"
        return f"Load average (1 min): {self.load_before:.2f} before the run, {after}."


@dataclass
class Report:
    """A benchmark's markdown report and the JSON with the same numbers."""

    benchmark: str
    machine: Machine
    command: str
    smoke: bool
    #: Markdown blocks (paragraphs and tables), in order.
    sections: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        header = [
            f"Machine: {self.machine.describe()}",
            self.machine.load_line(),
            f"Command: `{self.command}`" + (" (smoke sizes: not a measurement)" if self.smoke else ""),
        ]
        return "\n\n".join([*header, *self.sections]) + "\n"

    def as_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "machine": asdict(self.machine),
            "command": self.command,
            "smoke": self.smoke,
            "results": self.results,
        }


def start(benchmark: str, argv: Sequence[str] | None, smoke: bool) -> Report:
    """Describe the machine (printed at once, before any work) and open the report."""
    machine = Machine.now()
    print(f"Machine: {machine.describe()}", flush=True)
    print(f"Load average (1 min) before the run: {machine.load_before:.2f}", flush=True)
    return Report(benchmark, machine, command_line(argv), smoke)


def finish(report: Report, out: Path | None) -> None:
    """Record the load average after the run, print the report and write it (and its JSON) to ``out``."""
    report.machine.load_after = os.getloadavg()[0]
    text = report.markdown()
    print()
    print(text, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        json_path(out).write_text(json.dumps(report.as_json(), indent=1) + "\n")
        print(f"wrote {out} and {json_path(out)}")


def json_path(out: Path) -> Path:
    """Where the JSON of a report written to ``out`` goes."""
    return out.with_suffix(".json")


def command_line(argv: Sequence[str] | None) -> str:
    given = sys.argv[1:] if argv is None else list(argv)
    script = Path(sys.argv[0]).resolve()
    return shlex.join([os.path.relpath(sys.executable, REPO), os.path.relpath(script, REPO), *given])


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true", help="tiny sizes that finish in under a minute (CI)")
    parser.add_argument("--out", type=Path, help="also write the markdown report here, and its JSON beside it")


def bench_spec(spec_file: str, overrides: Iterable[str]) -> Spec:
    """A fedray spec from a file under the repository (e.g. ``jobs/quickstart.yaml``) with overrides."""
    return load_spec(REPO / spec_file, list(overrides))


@contextmanager
def local_ray(num_cpus: float, num_gpus: float = 0.0) -> Iterator[float]:
    """A new local Ray of its own (never an existing cluster) for the block; yields its start-up seconds."""
    for key, value in RAY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    started = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        object_store_memory=OBJECT_STORE_BYTES,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        yield time.perf_counter() - started
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class Clients:
    """Round 0 of the first clients of a run, as fedray's server would start them."""

    #: The base model as it goes into the object store.
    base: SharedBase
    inits: list[ClientInit]
    #: Each client's example indices in the train split.
    shards: list
    head: dict | None
    seeds: list[int]


def prepare_run(spec: Spec) -> Prepared:
    """What fedray's driver derives from ``spec`` before Ray starts; its own function, so the
    benchmarks cannot drift from it."""
    return prepare(spec)


def create_run_method(spec: Spec, base: Base) -> Method:
    """The run's method, as fedray's aggregation actor creates it."""
    shapes = target_layers(base.model, base.target_modules)
    return create_method(spec.method, shapes, spec.max_rank, scale=spec.scale, seed=spec.seed, **spec.method_options)


def prepare_clients(spec: Spec, count: int) -> Clients:
    """The base model and the starts, shards and seeds of clients 0..count-1 in round 0."""
    if count > spec.num_clients:
        raise SystemExit(f"{count} clients asked for, but the spec has num_clients={spec.num_clients}; lower it")
    prepared = prepare_run(spec)
    base = prepared.base
    method = create_run_method(spec, base)
    clients = range(count)
    return Clients(
        base=export_base(base),
        inits=[method.client_init(client, prepared.client_ranks[client]) for client in clients],
        shards=[prepared.partition.shards[client] for client in clients],
        head=head_state(base.model) or None,
        seeds=[client_seed(spec, 0, client) for client in clients],
    )


def with_resources(spec: Spec, num_cpus: float, num_gpus: float = 0.0) -> Spec:
    """``spec`` with its client tasks asking for ``num_cpus`` and ``num_gpus``."""
    resources = spec.resources.model_copy(update={"num_cpus": num_cpus, "num_gpus": num_gpus})
    return spec.model_copy(update={"resources": resources})


@ray.remote(max_calls=0)
def warm_up(run_key: str, shared_box: list | None, spec: Spec, start_line, parties: int) -> int:
    """Import fedray, load the data and (given ``shared_box``) build this worker's workbench, then
    wait until ``parties`` warm-up tasks run at once; returns the worker's process id."""
    if shared_box is not None:
        tasks.workbench(run_key, shared_box)
    inputs.dataset_split(spec)
    ray.get(start_line.arrive.remote())
    deadline = time.monotonic() + WARM_UP_TIMEOUT_S
    while ray.get(start_line.count.remote()) < parties and time.monotonic() < deadline:
        time.sleep(WARM_UP_POLL_S)
    return os.getpid()


def warm_workers(run_key: str, shared_box: list | None, spec: Spec, parties: int) -> set[int]:
    """``parties`` distinct warm workers for client tasks of ``spec``, all alive at once (their pids).

    Client tasks launched right after start together on these workers, instead of one
    after another as cold workers finish importing torch.
    """
    start_line = StartLine.remote()
    pids = ray.get(
        [
            warm_up.options(**task_resources(spec)).remote(run_key, shared_box, spec, start_line, parties)
            for _ in range(parties)
        ]
    )
    ray.kill(start_line)
    return set(pids)


def max_overlap(intervals: Iterable[tuple[float, float]]) -> int:
    """The largest number of (start, end) intervals open at one instant; one that ends as
    another starts does not overlap it."""
    # At equal times an end (0) sorts before a start (1).
    events = sorted(event for start, end in intervals for event in ((start, 1), (end, 0)))
    open_now = largest = 0
    for _, is_start in events:
        open_now += 1 if is_start else -1
        largest = max(largest, open_now)
    return largest


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def client_status(task: ray.ObjectRefGenerator) -> dict[str, Any]:
    """Wait for one of fedray's ``train_task``s to end; its status (the task's error is raised)."""
    refs = list(task)[:2]  # STARTED and the status; a failed task's last ref is its error
    return ray.get(refs)[-1]
