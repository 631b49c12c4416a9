"""Joining a Ray cluster, or starting a local one, and checking services before any work."""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading

import ray

from fedray.config import Spec
from fedray.tracking.store import check_tracking_uri

#: Object store of a local Ray instance: the base model once plus a few rounds of factors.
LOCAL_OBJECT_STORE_BYTES = 1 << 30
#: Seconds to wait for a Ray address to accept a connection before giving up.
ADDRESS_CHECK_TIMEOUT_S = 5.0
#: What a user does when no cluster answers at an address.
_JOIN_HINT = (
    "start it with `ray start --head`, fix --address, or leave --address and RAY_ADDRESS unset to run on this machine"
)


def check_services(tracking_uri: str, address: str | None) -> None:
    """The tracking server and the Ray cluster answer (within seconds), before any work."""
    check_tracking_uri(tracking_uri)
    address = address or os.environ.get("RAY_ADDRESS")
    if address and not ray.is_initialized():
        _check_reachable(address)


def connect_ray(address: str | None, spec: Spec, *more: Spec) -> None:
    """Join the cluster at ``address`` (or RAY_ADDRESS), else start a local one sized for
    ``spec``, and check that this machine offers what ``spec`` and ``more`` (a sweep's
    other cells) ask of a client task."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ConnectionError(
                f"cannot join the Ray cluster at {address!r} ({str(error).splitlines()[0]}); {_JOIN_HINT}"
            ) from None
        _restore_sigterm(on_sigterm)
        return
    cores = os.cpu_count() or 1
    ray.init(
        num_cpus=cores,
        object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,  # not "Started a local Ray instance" before every run
        # Ray keeps one idle worker per CPU and kills the rest within a second. With fractional
        # CPUs more client tasks than cores run at once, and every killed worker costs a new
        # process and a base build the next round: keep one worker per task that fits.
        _system_config={"num_workers_soft_limit": max(cores, math.ceil(cores / spec.resources.num_cpus))},
    )
    _restore_sigterm(on_sigterm)
    available = ray.cluster_resources()
    for checked in (spec, *more):
        for resource, wanted in (("CPU", checked.resources.num_cpus), ("GPU", checked.resources.num_gpus)):
            if wanted > available.get(resource, 0):
                raise ValueError(
                    f"resources.num_{resource.lower()}s={wanted} but this machine offers "
                    f"{available.get(resource, 0)} {resource}; lower it or join a larger cluster with --address"
                )


def task_resources(spec: Spec) -> dict[str, float]:
    """The Ray resources of one client (or evaluation) task of ``spec``."""
    return {"num_cpus": spec.resources.num_cpus, "num_gpus": spec.resources.num_gpus}


def tasks_that_fit(spec: Spec) -> int:
    """How many client tasks of ``spec`` the cluster's resources hold at once now."""
    available = ray.cluster_resources()
    wanted = {"CPU": spec.resources.num_cpus, "GPU": spec.resources.num_gpus}
    return min(int(available.get(name, 0.0) / amount) for name, amount in wanted.items() if amount > 0)


def _check_reachable(address: str) -> None:
    """Fail within seconds if nothing listens at a ``host:port`` Ray address."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and other forms: Ray resolves them itself
    try:
        socket.create_connection((host, int(port)), timeout=ADDRESS_CHECK_TIMEOUT_S).close()
    except OSError as error:
        raise ConnectionError(f"cannot join the Ray cluster at {address!r} ({error}); {_JOIN_HINT}") from None


def _restore_sigterm(handler) -> None:
    """Give SIGTERM back to the Python ``handler`` it had before ``ray.init`` (``fedray``'s CLI
    turns it into a Ctrl-C), which Ray replaces with one that exits at once."""
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
