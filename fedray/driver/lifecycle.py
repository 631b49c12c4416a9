"""A run from start to end on the Ray driver: ``run`` starts one, ``resume`` continues one.

Everything that can fail on bad input (spec, data, model, tracking store, Ray address)
is checked before the first client trains. Then the driver connects to Ray, puts the base
model in the object store once, starts the aggregation actor and plays the rounds
(``fedray.driver.rounds``); at the end it exports the adapter and the method's figures.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import ray
import yaml
from mlflow.tracking import MlflowClient
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from rich.console import Console

import fedray
from fedray import inputs
from fedray.config import Spec, SpecError, load_spec
from fedray.driver import outputs
from fedray.driver.aggregator import Aggregator
from fedray.driver.checkpoint import CHECKPOINT_DIR, LATEST, Checkpoint, read_checkpoint
from fedray.driver.cluster import check_services, connect_ray, task_resources, tasks_that_fit
from fedray.driver.outputs import RunSummary
from fedray.driver.prepare import Prepared, prepare
from fedray.driver.rounds import Rounds, RunContext, RunFailed
from fedray.driver.storage import START_FILES, RemoteRunDir, is_remote
from fedray.methods import METHODS
from fedray.models import export_base, head_state, target_layers
from fedray.tracking.names import EVAL_METRICS, MAJORITY_METRIC
from fedray.tracking.store import DEFAULT_RUNS_ROOT, Tracker, default_tracking_uri
from fedray.worker.tasks import warm_task

__all__ = ["RunFailed", "RunSummary", "resume", "run", "run_or_resume", "saved_checkpoint"]

#: Aggregation actors of this driver's finished runs, idle until its next run takes one:
#: starting an actor costs a process and its imports (torch, MLflow), about 3 of the 5 s
#: of a tiny run here. A sweep's concurrent cells each take one. Each is kept with the Ray
#: session it lives in (the driver's node and job): a driver that starts Ray again (the
#: system benchmarks do) must not take an actor of a cluster that is gone.
_IDLE_AGGREGATORS: list[tuple[tuple[str, str], Any]] = []
_IDLE_LOCK = threading.Lock()
#: Idle actors kept at most (each holds torch and MLflow, about 0.6 GB).
MAX_IDLE_AGGREGATORS = 4
#: Spec fields a resumed run may change with --allow-spec-change (they alter no past round).
SAFE_TO_CHANGE = (
    "rounds",
    "eval.",
    "resources.",
    "reliability.client_timeout_s",
    "reliability.client_retries",
    "reliability.aggregator_restarts",
)


def run(
    spec: Spec,
    *,
    run_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    progress: bool = True,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> RunSummary:
    """Run ``spec`` from its first round to the end.

    ``run_name`` and ``tags`` add to the MLflow run's defaults (a sweep names its cells and
    tags them with their parent run and axis values). ``run_dir`` may be an fsspec URI
    (``s3://bucket/prefix``): see ``fedray.driver.storage``."""
    remote = None
    if run_dir is None:
        runs_root = DEFAULT_RUNS_ROOT
        run_dir = runs_root / spec.name / datetime.now().strftime("%Y%m%d-%H%M%S")
    elif is_remote(run_dir):
        remote = RemoteRunDir(str(run_dir))
        if remote.holds_run():
            raise FileExistsError(f"run directory {remote} already holds a run; choose a new --run-dir or --resume it")
        runs_root = DEFAULT_RUNS_ROOT
        run_dir = remote.stage_new()
    else:
        run_dir = Path(run_dir)
        runs_root = run_dir.parent
    leftovers = sorted(path.name for path in run_dir.iterdir()) if run_dir.is_dir() else []
    if set(leftovers) - set(START_FILES):
        # Only the files of a start that failed before its first round may be written over.
        raise FileExistsError(f"run directory {run_dir} already holds a run; choose a new --run-dir or --resume it")
    if tracking_uri is None:
        runs_root.mkdir(parents=True, exist_ok=True)  # the default store's folder
        tracking_uri = default_tracking_uri(runs_root)
    prepared, shared = _prepare(spec, run_dir, tracking_uri, address)
    (run_dir / "partition.json").write_text(json.dumps(prepared.partition.stats, indent=1))
    if remote is not None:
        remote.upload_start()
    label = spec.label or spec.method
    tracker = Tracker.start(
        tracking_uri,
        spec.name,
        artifact_root=runs_root / "mlartifacts",
        run_name=run_name or f"{label}-s{spec.seed}-{(remote or run_dir).name}",
        params=spec.flat() | {"label": label},
        tags=_tags(spec) | dict(tags or {}),
    )
    if prepared.task == "classification":
        # The reference line of every accuracy: what always answering the majority class scores.
        tracker.log_metrics(0, {MAJORITY_METRIC: inputs.eval_set(spec, prepared.split).majority_share()})
    return _execute(spec, run_dir, tracker, prepared, shared, progress, first_round=0, remote=remote)


def resume(
    run_dir: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    allow_spec_change: bool = False,
    address: str | None = None,
    progress: bool = True,
) -> RunSummary:
    """Continue ``run_dir`` (a folder or an fsspec URI) from its last complete round, in the same MLflow run."""
    remote = None
    if is_remote(run_dir):
        remote = RemoteRunDir(str(run_dir))
        run_dir = remote.stage_for_resume()
    run_dir = Path(run_dir)
    if not (run_dir / "spec.yaml").is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a fedray run directory (it has no spec.yaml); give --resume the directory "
            "a run wrote (runs/<name>/<time>/ unless --run-dir named one)"
        )
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
    checkpoint = read_checkpoint(run_dir)
    info = checkpoint.info
    if info["spec_digest"] != saved.digest():
        raise SpecError(f"{run_dir}/spec.yaml does not match its checkpoint; restore it or start a new run")
    prepared, shared = _prepare(spec, run_dir, info["tracking_uri"], address)
    tracker = Tracker(info["tracking_uri"], info["run_id"])
    MlflowClient(info["tracking_uri"]).update_run(info["run_id"], status="RUNNING")
    _catch_up(run_dir, tracker, checkpoint)
    first_round = info["round"] + 1
    return _execute(
        spec,
        run_dir,
        tracker,
        prepared,
        shared,
        progress,
        first_round=first_round,
        checkpoint=checkpoint,
        remote=remote,
    )


def run_or_resume(spec: Spec, run_dir: str | Path, **options) -> RunSummary:
    """Resume ``run_dir`` if it holds a checkpoint of ``spec``, else start ``spec`` there
    (``fedray run --resume-if-exists``: a resubmitted job continues where it stopped)."""
    saved = saved_checkpoint(run_dir)
    if saved is None:
        return run(spec, run_dir=run_dir, **options)
    if saved["spec_digest"] != spec.digest():
        raise SpecError(f"{run_dir} holds a run of another spec; give the same spec to continue it, or a new --run-dir")
    tracking_uri = options.pop("tracking_uri", None)
    if tracking_uri is not None and tracking_uri != saved["tracking_uri"]:
        raise SpecError(f"{run_dir} logs to {saved['tracking_uri']}, not {tracking_uri}; drop --tracking-uri")
    for naming in ("run_name", "tags"):  # the resumed run keeps its MLflow name and tags
        options.pop(naming, None)
    return resume(run_dir, **options)


def saved_checkpoint(run_dir: str | Path) -> dict | None:
    """What the last complete checkpoint of ``run_dir`` (a folder or an fsspec URI) records
    (round, run id, spec digest, metrics), without its tensors; None if it has none."""
    if is_remote(run_dir):
        return RemoteRunDir(str(run_dir)).newest_manifest()
    latest = Path(run_dir) / CHECKPOINT_DIR / LATEST
    return json.loads(latest.read_text()) if latest.is_file() else None


def _catch_up(run_dir: Path, tracker: Tracker, checkpoint: Checkpoint) -> None:
    """Make the run's records end at ``checkpoint``'s round: ``metrics.jsonl`` cut there, and
    the round logged to MLflow if that never happened (it is logged after its checkpoint)."""
    done = checkpoint.info["round"]
    outputs.restore_metrics(run_dir, checkpoint.info["metrics"])
    if not any(m.step == done for m in MlflowClient(tracker.uri).get_metric_history(tracker.run_id, "clients_ok")):
        tracker.log_metrics(done, outputs.numbers(checkpoint.info["metrics"]))


@dataclass(frozen=True)
class _Shared:
    """The base model in the object store, and the key of its workbenches in the workers."""

    run_key: str
    ref: Any


def _prepare(spec: Spec, run_dir: Path, tracking_uri: str, address: str | None) -> tuple[Prepared, _Shared]:
    """Check the services, build the run's inputs, join Ray (checking its resources), put
    the base in the object store and start warming the workers, and only then (re)write
    ``spec.yaml``: a start that fails writes nothing."""
    check_services(tracking_uri, address)
    prepared = prepare(spec)
    connect_ray(address, spec)
    shared = _Shared(uuid.uuid4().hex, ray.put(export_base(prepared.base)))
    _warm_workers(spec, shared)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(), sort_keys=False))
    return prepared, shared


def _warm_workers(spec: Spec, shared: _Shared) -> None:
    """One warm-up task per client slot of a round: the worker processes import torch and
    the model stack, build their workbench and read the data while the driver creates the
    MLflow run and the aggregation actor, instead of in the first round. Not waited for."""
    for _ in range(_client_slots(spec)):
        warm_task.options(**task_resources(spec)).remote(shared.run_key, [shared.ref], spec)


def _client_slots(spec: Spec) -> int:
    """Client tasks of ``spec`` the cluster runs at once now (at most a round's clients)."""
    return max(1, min(spec.sampled_clients, tasks_that_fit(spec)))


def _eval_parts(spec: Spec, prepared: Prepared) -> int:
    """How many tasks a classification evaluation is split into: one per client slot, at
    most one per batch. Generation is scored in one task."""
    if prepared.task != "classification":
        return 1
    batches = math.ceil(len(inputs.eval_set(spec, prepared.split)) / spec.eval.batch_size)
    return max(1, min(_client_slots(spec), batches))


def _execute(
    spec: Spec,
    run_dir: Path,
    tracker: Tracker,
    prepared: Prepared,
    shared: _Shared,
    progress: bool,
    *,
    first_round: int,
    checkpoint: Checkpoint | None = None,
    remote: RemoteRunDir | None = None,
) -> RunSummary:
    console = Console(stderr=True, quiet=not progress, soft_wrap=True)
    base = prepared.base
    status = "FAILED"
    aggregator = None
    try:
        aggregator = _start_aggregator(spec, base, tracker, checkpoint)
        context = RunContext(
            spec=spec,
            run_dir=run_dir,
            shards=prepared.partition.shards,
            client_ranks=prepared.client_ranks,
            shared_ref=shared.ref,
            aggregator=aggregator,
            tracker=tracker,
            run_key=shared.run_key,
            remote=remote,
            eval_parts=_eval_parts(spec, prepared),
        )
        metric_name = EVAL_METRICS[prepared.task]
        where = remote or run_dir
        console.print(f"fedray: run [bold]{tracker.run_id}[/] of experiment [bold]{spec.name}[/] in {where}")
        summary = RunSummary(where, tracker.uri, tracker.run_id, spec.name)
        shown = outputs.RoundProgress(console, rounds=spec.rounds, first_round=first_round, metric_name=metric_name)
        restarts = 0

        def done(record: dict[str, Any]) -> None:
            summary.rounds.append(record)
            shown.round_done(record)

        with shown:
            rounds = Rounds(context, shown.show, done)
            round_index = first_round
            while round_index < spec.rounds:
                try:
                    rounds.play(round_index)
                except ray.exceptions.RayActorError as error:
                    rounds.settle_or_drop(wait=True)
                    # The aggregation actor died (killed, out of memory, its node lost): a new
                    # one continues from the last checkpoint and the round in flight is replayed.
                    restarts += 1
                    if restarts > spec.reliability.aggregator_restarts:
                        raise RunFailed(
                            f"the aggregation actor died {restarts} times (last: {type(error).__name__}); "
                            f"raise reliability.aggregator_restarts or `fedray run --resume {run_dir}`"
                        ) from error
                    context, round_index = _replace_aggregator(context, base, summary, first_round)
                    aggregator = context.aggregator
                    rounds.run = context
                    shown.show(f"aggregation actor lost; replaying from round {round_index + 1}")
                    continue
                except KeyboardInterrupt:
                    rounds.settle_or_drop(wait=False)
                    raise
                except Exception:
                    rounds.settle_or_drop(wait=True)  # the round before keeps its checkpoint
                    raise
                round_index += 1
        state, heatmaps = ray.get([aggregator.global_state.remote(), aggregator.heatmaps.remote()])
        outputs.export(run_dir, state, heatmaps, base, spec, tracker)
        summary.final_metrics = outputs.final_metrics(run_dir)
        summary.worker_builds = ray.get(aggregator.worker_builds.remote())
        (run_dir / "workers.json").write_text(json.dumps(summary.worker_builds, indent=1))
        if remote is not None:
            remote.upload_outputs()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        if aggregator is not None:
            ray.get(aggregator.abandon_round.remote())
        raise
    finally:
        tracker.end(status)
        if aggregator is not None:
            _done_with(aggregator, reusable=status == "FINISHED")
    return summary


def _replace_aggregator(context: RunContext, base, summary: RunSummary, first_round: int) -> tuple[RunContext, int]:
    """A new aggregation actor from the last checkpoint in place of a dead one; the run's
    records cut back to that checkpoint. Returns the new context and the round to play next."""
    ray.kill(context.aggregator)
    checkpoint = _last_checkpoint(context.run_dir)
    aggregator = _start_aggregator(context.spec, base, context.tracker, checkpoint)
    next_round = 0 if checkpoint is None else checkpoint.info["round"] + 1
    summary.rounds = [record for record in summary.rounds if record["round"] < next_round]
    if checkpoint is not None:
        _catch_up(context.run_dir, context.tracker, checkpoint)
        done = checkpoint.info["round"]
        if done >= first_round and not any(record["round"] == done for record in summary.rounds):
            summary.rounds.append(checkpoint.info["metrics"])  # lost between its checkpoint and its return
    return dataclasses.replace(context, aggregator=aggregator), next_round


def _start_aggregator(spec: Spec, base, tracker: Tracker, checkpoint: Checkpoint | None):
    """An aggregation actor for this run (an idle one of this driver's finished runs, else a
    new one), holding ``checkpoint``'s state if one is given."""
    shapes = target_layers(base.model, base.target_modules)
    run = (spec, METHODS[spec.method], shapes, head_state(base.model) or None, tracker.uri, tracker.run_id)
    aggregator = None
    with _IDLE_LOCK:
        session = _ray_session()
        _IDLE_AGGREGATORS[:] = [(where, idle) for where, idle in _IDLE_AGGREGATORS if where == session]
        idle = _IDLE_AGGREGATORS.pop()[1] if _IDLE_AGGREGATORS else None
    if idle is not None:
        try:
            ray.get(idle.start_run.remote(*run))
            aggregator = idle
        except ray.exceptions.RayActorError:
            pass  # it died while idle (its node went away): start a new one
    if aggregator is None:
        # On the driver's node: the tracking URI and paths the user gave are valid there, and
        # the actor never keeps an autoscaled GPU worker alive (or dies with a spot one).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        aggregator = Aggregator.options(scheduling_strategy=here).remote(*run)
    if checkpoint is not None:
        ray.get(aggregator.load_state.remote(checkpoint.method_state, checkpoint.head, checkpoint.server_state))
    return aggregator


def _done_with(aggregator, *, reusable: bool) -> None:
    """Keep a finished run's actor for this driver's next run (up to MAX_IDLE_AGGREGATORS),
    else end it; an actor of a failed or stopped run always ends."""
    if reusable:
        try:
            ray.get(aggregator.release.remote())
        except ray.exceptions.RayActorError:
            return
        with _IDLE_LOCK:
            if len(_IDLE_AGGREGATORS) < MAX_IDLE_AGGREGATORS:
                _IDLE_AGGREGATORS.append((_ray_session(), aggregator))
                return
    ray.kill(aggregator)


def _ray_session() -> tuple[str, str]:
    """This driver's node and job: which Ray session its actors live in."""
    context = ray.get_runtime_context()
    return context.get_node_id(), context.get_job_id()


def _last_checkpoint(run_dir: Path) -> Checkpoint | None:
    try:
        return read_checkpoint(run_dir)
    except FileNotFoundError:
        return None


def _tags(spec: Spec) -> dict[str, str]:
    tags = {
        "method": spec.method,
        "label": spec.label or spec.method,
        "model": spec.model,
        "dataset": spec.dataset,
        "partition": spec.partition,
        "seed": str(spec.seed),
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
