"""Flower peer of fedray's FedIT: the same federated run on Flower's simulation engine (Ray backend).

The ServerApp runs Flower's message-based ``FedAvg`` (weighted by ``num-examples``) over
FedIT's state: each layer's B and A are averaged on their own, which is FedIT's
aggregate, and the task head is averaged the same way, as fedray does. Each round it
sends fedray's sampled clients (``sampling.sample_clients``) to the ClientApp of
``flower_client.py``, which trains them with fedray's own ``Workbench.train``; after a round
the global model is evaluated centrally with fedray's ``Workbench.evaluate`` on fedray's
eval set, at fedray's cadence (every ``eval.every`` rounds and after the last).

Measured like ``compare.py`` measures fedray: wall time per round, the whole run's wall
time, peak PSS summed over the driver and every Ray process it started, and the final
eval metrics. Runs in ``.venv-peer`` (``make peer-env``):

    .venv-peer/bin/python benchmarks/peers/flower_fedit.py jobs/fedit.yaml --out runs/peers/flower.json
    .venv-peer/bin/python benchmarks/peers/flower_fedit.py --smoke --out /tmp/flower-smoke.json
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from collections.abc import Iterable
from typing import Any

import bench
import flower_client
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.simulation import run_simulation
from pss import PssSampler

from fedray import inputs
from fedray.config import Spec, SpecError
from fedray.data import TextDataset
from fedray.driver.cluster import LOCAL_OBJECT_STORE_BYTES
from fedray.driver.sampling import sample_clients
from fedray.methods import Method, create_method
from fedray.models import export_base, head_state, load_base, target_layers
from fedray.worker.workbench import Workbench

#: Seconds Flower's grid waits for a round's replies before giving up on them.
ROUND_TIMEOUT_S = 24 * 3600


class FedITStrategy(FedAvg):
    """Flower's FedAvg on fedray's clients, with fedray's central evaluation; records every round.

    The round starts in ``configure_train`` and ends when ``evaluate`` has run for it, so
    a round's time covers sampling, the clients' training, aggregation and (when due)
    evaluation, as fedray's ``round_s`` does.
    """

    def __init__(self, spec: Spec, method: Method, evaluator: Workbench, eval_set: TextDataset) -> None:
        super().__init__(
            fraction_evaluate=0.0,  # no federated evaluation: fedray evaluates centrally only
            min_available_nodes=spec.num_clients,
            weighted_by_key=flower_client.NUM_EXAMPLES_KEY,
            arrayrecord_key=flower_client.ARRAYS_KEY,
            configrecord_key=flower_client.CONFIG_KEY,
        )
        self.spec = spec
        self.method = method
        self.evaluator = evaluator
        self.eval_set = eval_set
        self.rounds: list[dict[str, Any]] = []
        self._started: dict[int, float] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per client fedray samples this round, each naming its client."""
        self._started[server_round] = time.perf_counter()
        clients = sample_clients(self.spec, server_round - 1)
        # Flower's node ids are random; client c plays on the c-th node, and its message says so
        # (the ClientApp takes the client from the message, not from the node's partition-id).
        _, nodes = sample_nodes(grid, self.spec.num_clients, self.spec.num_clients)
        nodes = sorted(nodes)
        spec_json = self.spec.model_dump_json()
        messages = []
        for client in clients:
            client_config = ConfigRecord(
                {
                    **config,
                    flower_client.SPEC_KEY: spec_json,
                    flower_client.CLIENT_ID_KEY: client,
                    flower_client.ROUND_KEY: server_round,
                }
            )
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: client_config})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=nodes[client]))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's aggregate; a client that failed fails the run (fedray would retry it, the peer does not)."""
        replies = list(replies)
        errors = [reply.error.reason for reply in replies if reply.has_error()]
        if errors or len(replies) != self.spec.sampled_clients:
            raise RuntimeError(f"round {server_round}: {len(replies)} replies, errors: {errors}")
        reported = [reply.content[flower_client.METRICS_KEY] for reply in replies]
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.rounds.append(
            {
                "round": server_round - 1,
                "clients": sorted(int(client[flower_client.CLIENT_ID_KEY]) for client in reported),
                "train_loss": float(metrics["train_loss"]),
                "client_s_p50": statistics.median(float(client["client_s"]) for client in reported),
            }
        )
        return arrays, metrics

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Central evaluation with fedray's ``Workbench.evaluate`` when fedray would evaluate; ends the round."""
        if server_round == 0:
            return None  # Flower evaluates the initial model too; fedray does not
        round_index = server_round - 1
        record = self.rounds[-1]
        assert record["round"] == round_index, (record, server_round)
        metrics = None
        if round_index == self.spec.rounds - 1 or server_round % self.spec.eval.every == 0:
            B, A, head = flower_client.from_arrays(arrays, list(self.method.shapes))
            state = self.method.state_dict()
            state["tensors"] |= {flower_client.factor_name(layer, "B"): B[layer] for layer in B}
            state["tensors"] |= {flower_client.factor_name(layer, "A"): A[layer] for layer in A}
            self.method.load_state_dict(state)
            scores = self.evaluator.evaluate(
                self.method.global_delta(),
                self.eval_set,
                self.spec.eval,
                max_seq_len=self.spec.train.max_seq_len,
                head=head,
            )
            record.update(scores)
            metrics = MetricRecord(scores)
        record["round_s"] = time.perf_counter() - self._started[server_round]
        return metrics


def backend_config(spec: Spec) -> dict[str, Any]:
    """Flower's Ray backend: fedray's per-client resources, and the Ray fedray starts on one machine."""
    return {
        "client_resources": {"num_cpus": spec.resources.num_cpus, "num_gpus": spec.resources.num_gpus},
        "init_args": {
            "num_cpus": os.cpu_count(),
            "object_store_memory": LOCAL_OBJECT_STORE_BYTES,
            "include_dashboard": False,
            "log_to_driver": False,
        },
    }


def run_flower(spec: Spec, *, verbose: bool = False) -> list[dict[str, Any]]:
    """Run ``spec`` (FedIT) on Flower's simulation engine; return its per-round records."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    # The driver evaluates, with the threads a fedray eval task gets.
    torch.set_num_threads(flower_client.torch_threads(spec))
    split = inputs.dataset_split(spec)
    base = load_base(inputs.model_spec(spec, split))
    shapes = target_layers(base.model, base.target_modules)
    method = create_method(spec.method, shapes, spec.max_rank, scale=spec.scale, seed=spec.seed, **spec.method_options)
    start = method.state_dict()["tensors"]
    initial = flower_client.to_arrays(
        {layer: start[flower_client.factor_name(layer, "B")] for layer in shapes},
        {layer: start[flower_client.factor_name(layer, "A")] for layer in shapes},
        head_state(base.model) or None,
    )
    strategy = FedITStrategy(spec, method, Workbench(export_base(base)), inputs.eval_set(spec, split))
    server_app = ServerApp()

    @server_app.main()
    def server_main(grid: Grid, context: Context) -> None:
        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=spec.rounds,
            timeout=ROUND_TIMEOUT_S,
            evaluate_fn=strategy.evaluate,
        )

    run_simulation(
        server_app=server_app,
        client_app=flower_client.app,
        num_supernodes=spec.num_clients,
        backend_config=backend_config(spec),
        verbose_logging=verbose,
    )
    if len(strategy.rounds) != spec.rounds or "round_s" not in strategy.rounds[-1]:
        raise RuntimeError(f"the Flower simulation ended after {len(strategy.rounds)} of {spec.rounds} rounds")
    return strategy.rounds


def main(argv: list[str] | None = None) -> int:
    args = bench.parse_args(
        "Run fedray's FedIT spec on Flower's simulation engine and measure it.",
        argv,
        lambda parser: parser.add_argument("--verbose", action="store_true", help="Flower's INFO log"),
    )
    try:
        spec = bench.peer_spec(args.spec, args.overrides, smoke=args.smoke)
    except SpecError as error:
        print(f"flower_fedit: {error}", file=sys.stderr)
        return bench.EXIT_BAD_INPUT
    load_before = bench.load_avg()
    with PssSampler() as sampler:
        started = time.perf_counter()
        rounds = run_flower(spec, verbose=args.verbose)
        total_s = time.perf_counter() - started
    result = bench.RunResult("flower", spec, rounds, total_s, sampler.peak, load_before, bench.load_avg())
    result.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
