"""The server: the round loop on the Ray driver.

Everything that can fail on bad input (spec, data, model, tracking store, Ray address)
is checked before the first client trains. Each round the driver samples clients, asks
the aggregation actor for their starts, launches one Ray task per client over the one
shared copy of the base model, and hands the tasks' ObjectRefs to the actor, which
aggregates them as they finish. The driver itself only ever holds small metric dicts.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import ray
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import save_file

import fedray
from fedray import job
from fedray.aggregator import Aggregator
from fedray.client import HEAD_MODULES
from fedray.config import Spec
from fedray.data import create_partitioner
from fedray.methods import save_state
from fedray.models import export_base, load_base, target_layers
from fedray.ranks import assign_ranks
from fedray.tasks import eval_task, train_task
from fedray.tracking import Tracker, check_tracking_uri, default_tracking_uri

#: Object store of a local Ray instance: the base model once plus a few rounds of factors.
LOCAL_OBJECT_STORE_BYTES = 1 << 30
#: Where run directories go unless --run-dir names one.
DEFAULT_RUNS_ROOT = Path("runs")


@dataclass
class RunSummary:
    """What a finished run leaves behind."""

    run_dir: Path
    tracking_uri: str
    run_id: str
    experiment: str
    final_metrics: dict[str, float]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    worker_builds: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ui_command(self) -> str:
        if self.tracking_uri.startswith("http"):
            return f"open {self.tracking_uri}"
        return f"mlflow ui --backend-store-uri {self.tracking_uri}"


def run(
    spec: Spec,
    *,
    run_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    progress: bool = True,
) -> RunSummary:
    """Run ``spec`` to the end and return where its results are."""
    console = Console(stderr=True, quiet=not progress)

    # --- preflight: every input is checked before any training starts
    if tracking_uri:
        check_tracking_uri(tracking_uri)
    split = job.dataset_split(spec)
    partitioner = create_partitioner(spec.partition, **({"seed": spec.seed} | spec.partition_options))
    partition = partitioner.partition(split.train, spec.num_clients)
    client_ranks = assign_ranks(
        spec.num_clients, max_rank=spec.max_rank, ranks=spec.ranks, proportions=spec.rank_proportions, seed=spec.seed
    )
    base = load_base(job.model_spec(spec, split))
    shapes = target_layers(base.model, base.target_modules)
    if run_dir is None:
        runs_root = DEFAULT_RUNS_ROOT
        run_dir = runs_root / spec.name / datetime.now().strftime("%Y%m%d-%H%M%S")
    else:
        run_dir = Path(run_dir)
        runs_root = run_dir.parent
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run directory {run_dir} already holds a run; choose a new --run-dir")
    tracking_uri = tracking_uri or default_tracking_uri(runs_root)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(), sort_keys=False))
    (run_dir / "partition.json").write_text(json.dumps(partition.stats, indent=1))

    _connect_ray(address, spec)
    shared = export_base(base)
    shared_ref = ray.put(shared)
    head = _initial_head(base.model)
    del shared

    tracker = Tracker.start(
        tracking_uri,
        spec.name,
        artifact_root=runs_root / "mlartifacts",
        run_name=run_dir.name,
        params=spec.flat(),
        tags=_tags(spec),
    )
    console.print(f"fedray: run [bold]{tracker.run_id}[/] of experiment [bold]{spec.name}[/] in {run_dir}")
    aggregator = Aggregator.remote(spec, shapes, head, tracking_uri, tracker.run_id)
    run_key = tracker.run_id
    resources = {"num_cpus": spec.resources.num_cpus, "num_gpus": spec.resources.num_gpus}
    summary = RunSummary(run_dir, tracking_uri, tracker.run_id, spec.name, {})
    metric_name = "eval_accuracy" if split.train.task == "classification" else "eval_rougeL"
    last_metric = "-"
    status = "FAILED"
    try:
        with (
            _progress(console) as bar,
            (run_dir / "metrics.jsonl").open("w") as metrics_file,
        ):
            rounds_task = bar.add_task("rounds", total=spec.rounds, info="")
            for round_index in range(spec.rounds):
                started = time.perf_counter()
                sampled = job.sample_clients(spec, round_index)
                head_ref = aggregator.global_head.remote()
                results = [
                    train_task.options(**resources).remote(
                        run_key,
                        [shared_ref],
                        aggregator.client_init.remote(client, client_ranks[client]),
                        partition.shards[client],
                        spec,
                        head_ref,
                        job.client_seed(spec, round_index, client),
                    )
                    for client in sampled
                ]
                last_round = round_index == spec.rounds - 1
                collect = last_round and spec.method == "fedplora"
                round_ref = aggregator.run_round.remote(round_index, [results], collect)
                pending = list(results)
                while pending:
                    _, pending = ray.wait(pending, num_returns=1, fetch_local=False)
                    done = len(results) - len(pending)
                    bar.update(rounds_task, info=f"round {round_index + 1}: clients {done}/{len(results)}")
                metrics = ray.get(round_ref)
                failures = metrics.pop("failures")
                if last_round or (round_index + 1) % spec.eval.every == 0:
                    state_ref = aggregator.global_state.remote()
                    evaluation = ray.get(eval_task.options(**resources).remote(run_key, [shared_ref], state_ref, spec))
                    metrics |= evaluation
                    last_metric = f"{metric_name}={evaluation[metric_name]:.3f}"
                metrics["round_s"] = time.perf_counter() - started
                aggregator.log_metrics.remote(
                    round_index, {k: v for k, v in metrics.items() if k.startswith("eval_") or k == "round_s"}
                )
                record = {"round": round_index, "clients": sampled, **metrics, "failures": failures}
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                summary.rounds.append(record)
                bar.update(rounds_task, advance=1, info=last_metric)
        _export(summary, aggregator, base, spec, shapes, tracker)
        summary.final_metrics = {k: v for k, v in summary.rounds[-1].items() if k.startswith("eval_")}
        summary.worker_builds = ray.get(aggregator.worker_builds.remote())
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)
        ray.kill(aggregator)
    _print_summary(console, summary)
    return summary


def _connect_ray(address: str | None, spec: Spec) -> None:
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
                f"cannot join the Ray cluster at {address!r} ({error}); start it with `ray start --head`, "
                "fix --address, or leave --address and RAY_ADDRESS unset to run on this machine"
            ) from None
        return
    ray.init(
        num_cpus=os.cpu_count(),
        object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        include_dashboard=False,
        log_to_driver=False,
    )
    available = ray.cluster_resources()
    for resource, wanted in (("CPU", spec.resources.num_cpus), ("GPU", spec.resources.num_gpus)):
        if wanted > available.get(resource, 0):
            raise ValueError(
                f"resources.num_{resource.lower()}s={wanted} but this machine offers {available.get(resource, 0)} "
                f"{resource}; lower it or join a larger cluster with --address"
            )


def _initial_head(model) -> dict | None:
    """The base model's task head, the start of the global head (None without one)."""
    head = {name: p.detach().clone() for name, p in model.named_parameters() if name.split(".")[0] in HEAD_MODULES}
    return head or None


def _tags(spec: Spec) -> dict[str, str]:
    tags = {
        "method": spec.method,
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


def _export(summary: RunSummary, aggregator, base, spec: Spec, shapes, tracker: Tracker) -> None:
    """Write the final adapter (and Fed-PLoRA's module heatmap) and log the artifacts."""
    from fedray.export import export_adapter, plot_module_similarity

    global_delta, head = ray.get(aggregator.global_state.remote())
    checkpoint = summary.run_dir / "checkpoint"
    checkpoint.mkdir(exist_ok=True)
    save_state(ray.get(aggregator.state_dict.remote()), checkpoint / "method.safetensors")
    if head is not None:
        save_file({name: value.contiguous() for name, value in head.items()}, str(checkpoint / "head.safetensors"))
    info = export_adapter(
        summary.run_dir / "adapter",
        base_model=base.model,
        global_delta=global_delta,
        head=head,
        scale=spec.scale,
        max_rank=spec.max_rank,
        source=spec.model,
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
        transient=False,
    )


def _print_summary(console: Console, summary: RunSummary) -> None:
    final = ", ".join(f"{k}={v:.4f}" for k, v in summary.final_metrics.items())
    console.print(f"final: {final}")
    console.print(f"run directory: {summary.run_dir}")
    console.print(f"MLflow run id: {summary.run_id} (experiment {summary.experiment})")
    console.print(f"open the MLflow UI: {summary.ui_command}")
