"""The server: the round loop on the Ray driver.

Everything that can fail on bad input (spec, data, model, tracking store, Ray address)
is checked before the first client trains. Each round the driver samples clients, asks
the aggregation actor for their starts, and launches one Ray task per client over the
one shared copy of the base model. It reads only each task's small status: a finished
client's result goes to the actor by reference, a failed or timed-out one is retried
and then dropped, and a round with too few survivors is re-run with a fresh sample.
After each round the driver writes an atomic checkpoint, then the metrics are logged,
so a resumed run neither repeats nor misses a round.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import ray
import yaml
from mlflow.tracking import MlflowClient
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import fedray
from fedray import job
from fedray.aggregator import Aggregator, TooFewClients
from fedray.checkpoint import read_checkpoint, write_checkpoint
from fedray.client import head_state
from fedray.config import Spec, SpecError, load_spec
from fedray.data import create_partitioner
from fedray.models import export_base, load_base, target_layers
from fedray.tasks import eval_task, train_task
from fedray.tracking import Tracker, check_tracking_uri, default_tracking_uri

#: Object store of a local Ray instance: the base model once plus a few rounds of factors.
LOCAL_OBJECT_STORE_BYTES = 1 << 30
#: Where run directories go unless --run-dir names one.
DEFAULT_RUNS_ROOT = Path("runs")
#: How often the driver looks at running client tasks (progress, timeouts).
POLL_S = 0.5
#: Spec fields a resumed run may change with --allow-spec-change (they alter no past round).
SAFE_TO_CHANGE = ("rounds", "eval.", "resources.", "reliability.client_timeout_s", "reliability.client_retries")


#: Seconds to wait for a Ray address to accept a connection before giving up.
ADDRESS_CHECK_TIMEOUT_S = 5.0
#: Characters of a failure's message kept in the round's record.
REASON_CHARS = 300


class RunFailed(RuntimeError):
    """The run cannot make progress; its last checkpoint stays valid."""


@dataclass
class RunSummary:
    """What a finished run leaves behind."""

    run_dir: Path
    tracking_uri: str
    run_id: str
    experiment: str
    final_metrics: dict[str, float] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    worker_builds: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ui_command(self) -> str:
        if self.tracking_uri.startswith("http"):
            return f"open {self.tracking_uri}"
        return f"mlflow ui --backend-store-uri {self.tracking_uri}"


@dataclass
class _Run:
    """A run's fixed ingredients, shared by its rounds."""

    spec: Spec
    run_dir: Path
    shards: list
    client_ranks: list[int]
    shared_ref: Any
    aggregator: Any
    tracker: Tracker
    metric_name: str

    @property
    def resources(self) -> dict[str, float]:
        return {"num_cpus": self.spec.resources.num_cpus, "num_gpus": self.spec.resources.num_gpus}


def run(
    spec: Spec,
    *,
    run_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    progress: bool = True,
) -> RunSummary:
    """Run ``spec`` from its first round to the end."""
    if run_dir is None:
        runs_root = DEFAULT_RUNS_ROOT
        run_dir = runs_root / spec.name / datetime.now().strftime("%Y%m%d-%H%M%S")
    else:
        run_dir = Path(run_dir)
        runs_root = run_dir.parent
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run directory {run_dir} already holds a run; choose a new --run-dir or --resume it")
    tracking_uri = tracking_uri or default_tracking_uri(runs_root)
    _check_services(tracking_uri, address)
    prepared = prepare(spec)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(), sort_keys=False))
    (run_dir / "partition.json").write_text(json.dumps(prepared["partition"].stats, indent=1))
    tracker = Tracker.start(
        tracking_uri,
        spec.name,
        artifact_root=runs_root / "mlartifacts",
        run_name=run_dir.name,
        params=spec.flat(),
        tags=_tags(spec),
    )
    return _execute(spec, run_dir, tracker, prepared, address, progress, first_round=0)


def resume(
    run_dir: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    allow_spec_change: bool = False,
    address: str | None = None,
    progress: bool = True,
) -> RunSummary:
    """Continue ``run_dir`` from its last complete round, in the same MLflow run."""
    run_dir = Path(run_dir)
    saved = load_spec(run_dir / "spec.yaml")
    spec = load_spec(run_dir / "spec.yaml", overrides)
    changed = sorted(k for k, v in spec.flat().items() if saved.flat().get(k) != v)
    if changed:
        unsafe = [k for k in changed if not k.startswith(SAFE_TO_CHANGE)]
        if not allow_spec_change or unsafe:
            hint = (
                f"{unsafe} cannot change in a resumed run; start a new run instead"
                if unsafe
                else "pass --allow-spec-change to accept them"
            )
            raise SpecError(f"resuming {run_dir} with a changed spec ({', '.join(changed)}): {hint}")
    info, method_state, head = read_checkpoint(run_dir)
    if info["spec_digest"] != saved.digest():
        raise SpecError(f"{run_dir}/spec.yaml does not match its checkpoint; restore it or start a new run")
    _check_services(info["tracking_uri"], address)
    prepared = prepare(spec)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(), sort_keys=False))
    tracker = Tracker(info["tracking_uri"], info["run_id"])
    MlflowClient(info["tracking_uri"]).update_run(info["run_id"], status="RUNNING")
    done = info["round"]
    _restore_metrics(run_dir / "metrics.jsonl", info["metrics"])
    # The checkpoint is written before its round is logged: log it if that never happened.
    if not any(m.step == done for m in MlflowClient(tracker.uri).get_metric_history(tracker.run_id, "clients_ok")):
        tracker.log_metrics(done, _numbers(info["metrics"]))
    return _execute(
        spec, run_dir, tracker, prepared, address, progress, first_round=done + 1, state=(method_state, head)
    )


def _check_services(tracking_uri: str, address: str | None) -> None:
    """The tracking server and the Ray cluster answer (within seconds), before any work."""
    check_tracking_uri(tracking_uri)
    address = address or os.environ.get("RAY_ADDRESS")
    if address and not ray.is_initialized():
        _check_reachable(address)


def prepare(spec: Spec) -> dict[str, Any]:
    """Data, partition, ranks and base model: checked and built before Ray starts."""
    split = job.dataset_split(spec)
    partitioner = create_partitioner(spec.partition, **({"seed": spec.seed} | spec.partition_options))
    partition = partitioner.partition(split.train, spec.num_clients)
    base = load_base(job.model_spec(spec, split))
    client_ranks = job.client_ranks(spec, base)
    for stats, rank in zip(partition.stats, client_ranks, strict=True):
        stats["rank"] = rank
    return {"split": split, "partition": partition, "ranks": client_ranks, "base": base}


def _execute(
    spec: Spec,
    run_dir: Path,
    tracker: Tracker,
    prepared: dict[str, Any],
    address: str | None,
    progress: bool,
    *,
    first_round: int,
    state: tuple | None = None,
) -> RunSummary:
    console = Console(stderr=True, quiet=not progress)
    base = prepared["base"]
    status = "FAILED"
    aggregator = None
    try:
        connect_ray(address, spec)
        shapes = target_layers(base.model, base.target_modules)
        # On the driver's node: the tracking URI and paths the user gave are valid there, and
        # the actor never keeps an autoscaled GPU worker alive (or dies with a spot one).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        aggregator = Aggregator.options(scheduling_strategy=here).remote(
            spec, shapes, head_state(base.model) or None, tracker.uri, tracker.run_id
        )
        if state is not None:
            ray.get(aggregator.load_state.remote(*state))
        classification = prepared["split"].train.task == "classification"
        context = _Run(
            spec=spec,
            run_dir=run_dir,
            shards=prepared["partition"].shards,
            client_ranks=prepared["ranks"],
            shared_ref=ray.put(export_base(base)),
            aggregator=aggregator,
            tracker=tracker,
            metric_name="eval_accuracy" if classification else "eval_rougeL",
        )
        console.print(f"fedray: run [bold]{tracker.run_id}[/] of experiment [bold]{spec.name}[/] in {run_dir}")
        summary = RunSummary(run_dir, tracker.uri, tracker.run_id, spec.name)
        with _progress(console) as bar:
            task = bar.add_task("rounds", total=spec.rounds, completed=first_round, info="")
            for round_index in range(first_round, spec.rounds):
                record = _play_round(context, round_index, lambda info: bar.update(task, info=info))
                summary.rounds.append(record)
                last = record.get(context.metric_name)
                bar.update(task, advance=1, info=f"{context.metric_name}={last:.3f}" if last is not None else "")
        _export(summary, aggregator, base, spec, tracker)
        summary.final_metrics = _final_metrics(run_dir)
        summary.worker_builds = ray.get(aggregator.worker_builds.remote())
        (run_dir / "workers.json").write_text(json.dumps(summary.worker_builds, indent=1))
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        if aggregator is not None:
            ray.get(aggregator.abandon_round.remote())
        raise
    finally:
        tracker.end(status)
        if aggregator is not None:
            ray.kill(aggregator)
    _print_summary(console, summary)
    return summary


def _play_round(run: _Run, round_index: int, show) -> dict[str, Any]:
    """One round, re-sampled while too few clients survive; checkpointed, then logged."""
    spec = run.spec
    started = time.perf_counter()
    collect = round_index == spec.rounds - 1 and spec.method == "fedplora"
    attempts_failures: list[str] = []
    for attempt in range(spec.reliability.round_attempts):
        sampled = job.sample_clients(spec, round_index, attempt)
        inits = {client: run.aggregator.client_init.remote(client, run.client_ranks[client]) for client in sampled}
        ray.get(run.aggregator.begin_round.remote(collect, sampled))
        try:
            _run_clients(run, round_index, attempt, inits, show)
            metrics = ray.get(run.aggregator.end_round.remote())
            break
        except TooFewClients as error:
            attempts_failures.append(_failure_reason(error))
            show(f"round {round_index + 1}: too few clients, sampling again")
        except BaseException:
            ray.get(run.aggregator.abandon_round.remote())
            raise
    else:
        raise RunFailed(
            f"round {round_index + 1} failed {spec.reliability.round_attempts} times ({attempts_failures[-1]}); "
            f"the checkpoint of round {round_index} in {run.run_dir} is valid: fix the cause and "
            f"`fedray run --resume {run.run_dir}`"
        )
    failures = metrics.pop("failures")
    metrics["round_attempts"] = float(attempt + 1)
    if round_index == spec.rounds - 1 or (round_index + 1) % spec.eval.every == 0:
        state_ref = run.aggregator.global_state.remote()
        metrics |= ray.get(
            eval_task.options(**run.resources).remote(run.tracker.run_id, [run.shared_ref], state_ref, spec)
        )
    metrics["round_s"] = time.perf_counter() - started
    record = {"round": round_index, "clients": sampled, **metrics, "failures": failures}
    method_state, head = ray.get(run.aggregator.state.remote())
    info = {
        "run_id": run.tracker.run_id,
        "tracking_uri": run.tracker.uri,
        "experiment": spec.name,
        "spec_digest": spec.digest(),
        "metrics": record,
    }
    write_checkpoint(run.run_dir, round_index, method_state, head, info)
    with (run.run_dir / "metrics.jsonl").open("a") as metrics_file:
        metrics_file.write(json.dumps(record) + "\n")
    ray.get(run.aggregator.log_metrics.remote(round_index, _numbers(record)))
    return record


def _run_clients(run: _Run, round_index: int, attempt: int, inits: dict[int, Any], show) -> None:
    """Train the sampled clients (``inits``: their starts' refs); hand each result to the actor as it finishes."""
    spec, reliability = run.spec, run.spec.reliability
    head_ref = run.aggregator.global_head.remote()
    # Each task yields STARTED, its status, then its result (see ``train_task``). A task's
    # timeout clock starts at STARTED: waiting for a free slot or a new worker is not running.
    pending: dict[Any, list] = {}  # task -> [client, tries, started]

    def launch(client: int, tries: int) -> None:
        task = train_task.options(**run.resources).remote(
            run.tracker.run_id,
            [run.shared_ref],
            inits[client],
            run.shards[client],
            spec,
            head_ref,
            job.client_seed(spec, round_index, client),
            attempt * (reliability.client_retries + 1) + tries,
        )
        pending[task] = [client, tries, None]

    def failed(client: int, tries: int, reason: str) -> None:
        if tries < reliability.client_retries:
            launch(client, tries + 1)
        else:
            acknowledgements.append(run.aggregator.report_failure.remote(client, reason))

    acknowledgements: list = []
    for client in inits:
        launch(client, 0)
    finished = 0
    # Interrupted (Ctrl-C) or failed, the round's clients are not cancelled: cancelling a task
    # whose reply is on its way crashes Ray 2.60's owner ("Tried to complete task that was not
    # pending"), taking the driver down before it marks the run KILLED. Ray ends the tasks with
    # the driver that owns them; a caller that lives on sees them finish and their results dropped.
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
        for task in ready:
            entry = pending[task]
            client, tries, started = entry
            try:
                ray.get(next(task))  # STARTED, or the status once the client is done
            except ray.exceptions.RayError as error:
                del pending[task]
                failed(client, tries, _failure_reason(error))
                continue
            if started is None:
                entry[2] = time.monotonic()
                continue
            del pending[task]
            acknowledgements.append(run.aggregator.add.remote([next(task)]))
            finished += 1
        if reliability.client_timeout_s is not None:
            now = time.monotonic()
            for task, (client, tries, started) in list(pending.items()):
                if started is not None and now - started > reliability.client_timeout_s:
                    ray.cancel(task, force=True)
                    del pending[task]
                    failed(client, tries, f"timed out after {reliability.client_timeout_s} s")
        show(f"round {round_index + 1}: clients {finished}/{len(inits)}")
    ray.get(acknowledgements)


def _failure_reason(error: ray.exceptions.RayError) -> str:
    """One line on why a client task failed: its own exception, else Ray's error."""
    cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) and error.cause else error
    lines = str(cause).strip().splitlines() or [""]
    return f"{type(cause).__name__}: {lines[0][:REASON_CHARS]}"


def _check_reachable(address: str) -> None:
    """Fail within seconds if nothing listens at a ``host:port`` Ray address."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and other forms: Ray resolves them itself
    try:
        socket.create_connection((host, int(port)), timeout=ADDRESS_CHECK_TIMEOUT_S).close()
    except OSError as error:
        raise ConnectionError(
            f"cannot join the Ray cluster at {address!r} ({error}); start it with `ray start --head`, "
            "fix --address, or leave --address and RAY_ADDRESS unset to run on this machine"
        ) from None


def connect_ray(address: str | None, spec: Spec) -> None:
    """Join the cluster at ``address`` (or RAY_ADDRESS), else start a local one."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ConnectionError(
                f"cannot join the Ray cluster at {address!r} ({str(error).splitlines()[0]}); start it with "
                "`ray start --head`, fix --address, or leave --address and RAY_ADDRESS unset to run on this machine"
            ) from None
        return
    cores = os.cpu_count() or 1
    ray.init(
        num_cpus=cores,
        object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        include_dashboard=False,
        log_to_driver=False,
        # Ray keeps one idle worker per CPU and kills the rest within a second. With fractional
        # CPUs more client tasks than cores run at once, and every killed worker costs a new
        # process and a base build the next round: keep one worker per task that fits.
        _system_config={"num_workers_soft_limit": max(cores, math.ceil(cores / spec.resources.num_cpus))},
    )
    available = ray.cluster_resources()
    for resource, wanted in (("CPU", spec.resources.num_cpus), ("GPU", spec.resources.num_gpus)):
        if wanted > available.get(resource, 0):
            raise ValueError(
                f"resources.num_{resource.lower()}s={wanted} but this machine offers {available.get(resource, 0)} "
                f"{resource}; lower it or join a larger cluster with --address"
            )


def _tags(spec: Spec) -> dict[str, str]:
    tags = {
        "method": spec.method,
        "label": spec.label or spec.method,
        "model": spec.model,
        "dataset": spec.dataset,
        "partition": spec.partition,
        "fedray_version": fedray.__version__,
    }
    commit = _git_commit()
    if commit:
        tags["git_commit"] = commit
    return tags


def _git_commit() -> str | None:
    try:
        found = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return found.stdout.strip() or None


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float) and k != "round"}


def _restore_metrics(path: Path, record: dict[str, Any]) -> None:
    """Make ``metrics.jsonl`` end at the checkpointed round ``record``.

    The line of that round is written after its checkpoint, so a kill may have left it
    missing or cut off halfway: the checkpoint's own copy of the record replaces it.
    """
    lines = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            break  # the line the kill cut off: only ever the last
        if entry["round"] < record["round"]:
            lines.append(line)
    path.write_text("".join(line + "\n" for line in [*lines, json.dumps(record)]))


def _final_metrics(run_dir: Path) -> dict[str, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    return {k: v for k, v in last.items() if k.startswith("eval_")}


def _export(summary: RunSummary, aggregator, base, spec: Spec, tracker: Tracker) -> None:
    """Write the final adapter (and Fed-PLoRA's module heatmap) and log the artifacts."""
    from fedray.export import export_adapter, plot_module_similarity

    global_delta, head = ray.get(aggregator.global_state.remote())
    info = export_adapter(
        summary.run_dir / "adapter",
        base_model=base.model,
        global_delta=global_delta,
        head=head,
        scale=spec.scale,
        max_rank=spec.max_rank,
        source=spec.model,
        model_spec=base.spec,
    )
    tracker.log_metrics(spec.rounds - 1, {"adapter_dropped_fraction": info.dropped_fraction})
    if spec.method == "fedplora":
        modules = ray.get(aggregator.module_factors.remote())
        if len(modules) > 1:
            plot_module_similarity(
                modules,
                summary.run_dir / "module_similarity.png",
                max_rank=spec.max_rank,
                title=f"Fed-PLoRA module similarity across clients, round {spec.rounds}",
            )
    for name in ("spec.yaml", "partition.json", "metrics.jsonl", "module_similarity.png", "adapter"):
        path = summary.run_dir / name
        if path.exists():
            tracker.log_artifact(path, "adapter" if name == "adapter" else None)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]fedray"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    )


def _print_summary(console: Console, summary: RunSummary) -> None:
    final = ", ".join(f"{k}={v:.4f}" for k, v in summary.final_metrics.items())
    console.print(f"final: {final}")
    console.print(f"run directory: {summary.run_dir}")
    console.print(f"MLflow run id: {summary.run_id} (experiment {summary.experiment})")
    console.print(f"open the MLflow UI: {summary.ui_command}")
