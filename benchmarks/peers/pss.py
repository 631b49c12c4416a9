"""Peak memory of a whole run: the sum of PSS over a process and everything it started.

A local Ray run is a tree of processes: the driver starts the GCS server and the raylet,
the raylet starts the workers. PSS (proportional set size) charges every shared page to
the processes that map it in equal parts, so Ray's shared-memory object store, and a
base model that several workers map read-only, count once in the sum; a sum of RSS would
count them once per process that maps them.

    with PssSampler() as sampler:
        run()
    sampler.peak.bytes
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import psutil

#: Seconds between two samples of the process tree.
SAMPLE_INTERVAL_S = 0.2
#: Characters of a process's title kept as its label (Ray titles its workers ``ray::<what>``).
LABEL_CHARS = 40


@dataclass
class PssPeak:
    """The largest sample: total PSS, how many processes held it, and how it split by process kind."""

    bytes: int = 0
    processes: int = 0
    #: Seconds from the start of sampling to the peak.
    at_s: float = 0.0
    #: PSS at the peak per process label (summed over processes with the same label).
    by_label: dict[str, int] = field(default_factory=dict)
    #: Samples taken over the whole run.
    samples: int = 0


def process_label(process: psutil.Process) -> str:
    """A short name for ``process``: its title (``ray::ClientAppActor``, ``raylet``) without arguments."""
    try:
        words = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"
    if not words:
        return process.name()
    if words[0].startswith("ray::"):
        # ``ray::ClientAppActor.run`` while it runs a call, ``ray::ClientAppActor`` between calls.
        return words[0].split()[0].split(".")[0][:LABEL_CHARS]
    program = os.path.basename(words[0])
    if program.startswith("python"):
        # A Python process: name it by its script or module (``-m module``), past its options.
        arguments = iter(words[1:])
        for word in arguments:
            if word == "-m":
                return f"{program} -m {next(arguments, '')}"[:LABEL_CHARS]
            if not word.startswith("-"):
                return f"{program} {os.path.basename(word)}"[:LABEL_CHARS]
    return program[:LABEL_CHARS]


def tree_pss(root: psutil.Process) -> dict[int, tuple[str, int]]:
    """``{pid: (label, PSS bytes)}`` of ``root`` and all its live descendants."""
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    sizes = {}
    for process in processes:
        try:
            sizes[process.pid] = (process_label(process), process.memory_full_info().pss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # it ended between the listing and the read
    return sizes


class PssSampler:
    """Sample the PSS of a process tree from a daemon thread and keep the largest sample."""

    def __init__(self, root_pid: int | None = None, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.root = psutil.Process(root_pid or os.getpid())
        self.interval_s = interval_s
        self.peak = PssPeak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pss-sampler", daemon=True)
        self._started = 0.0

    def __enter__(self) -> PssSampler:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        self._started = time.perf_counter()
        self._thread.start()

    def stop(self) -> PssPeak:
        """Take a last sample, end the thread and return the peak."""
        self._stop.set()
        self._thread.join()
        return self.peak

    def sample(self) -> None:
        sizes = tree_pss(self.root)
        total = sum(pss for _, pss in sizes.values())
        self.peak.samples += 1
        if total > self.peak.bytes:
            by_label: Counter[str] = Counter()
            for label, pss in sizes.values():
                by_label[label] += pss
            self.peak.bytes = total
            self.peak.processes = len(sizes)
            self.peak.at_s = time.perf_counter() - self._started
            self.peak.by_label = dict(by_label.most_common())

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()
        self.sample()
