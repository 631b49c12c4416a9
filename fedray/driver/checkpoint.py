"""Atomic per-round checkpoints of a run, for exact resume.

A round's files are written under new names first; ``latest.json``, which names them,
is replaced last with an atomic rename, so a run killed at any instant leaves the
previous complete checkpoint intact. Tensors go to safetensors, the rest to JSON; no
pickle. Sampling, rank assignment and client seeds derive from the spec's seed and the
round index, so the method's state (its generator included) and the head are all the
randomness a resume needs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedray.methods import read_state, save_state

CHECKPOINT_DIR = "checkpoint"
LATEST = "latest.json"
#: Rounds whose files stay on disk (the newest, plus one in case the newest is mid-write).
KEEP_ROUNDS = 2


def write_checkpoint(
    run_dir: Path,
    round_index: int,
    method_state: Mapping[str, Any],
    head: Mapping[str, torch.Tensor] | None,
    info: Mapping[str, Any],
    server_state: Mapping[str, Any] | None = None,
) -> None:
    """Persist the state after ``round_index``; ``info`` is JSON (run id, spec digest, metrics);
    ``server_state`` is the server optimizer's, if the run has one."""
    folder = run_dir / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"round-{round_index:06d}"
    method_file, head_file = f"{stem}.method.safetensors", f"{stem}.head.safetensors"
    server_file = f"{stem}.server.safetensors"
    atomic_write(folder / method_file, lambda path: save_state(method_state, path))
    if server_state is not None:
        atomic_write(folder / server_file, lambda path: save_state(server_state, path))
    if head is not None:
        tensors = {name: value.contiguous() for name, value in head.items()}
        atomic_write(folder / head_file, lambda path: save_file(tensors, str(path)))
    record = {"round": round_index, "method": method_file, "head": head_file if head is not None else None}
    record |= {"server": server_file if server_state is not None else None, **info}
    atomic_write(folder / LATEST, lambda path: path.write_text(json.dumps(record, indent=1)))
    for old in sorted(folder.glob("round-*.safetensors")):
        if int(old.name.split(".")[0].removeprefix("round-")) <= round_index - KEEP_ROUNDS:
            old.unlink()


@dataclass(frozen=True)
class Checkpoint:
    """The last complete round of a run."""

    #: JSON: the round, the run id and tracking URI, the spec's digest, the round's metrics.
    info: dict[str, Any]
    #: The method's ``state_dict()``.
    method_state: dict[str, Any]
    head: dict[str, torch.Tensor] | None
    #: The server optimizer's ``state_dict()``, if the run has one.
    server_state: dict[str, Any] | None = None


def read_checkpoint(run_dir: Path) -> Checkpoint:
    """The last complete round of ``run_dir``."""
    folder = run_dir / CHECKPOINT_DIR
    if not (folder / LATEST).is_file():
        raise FileNotFoundError(f"{run_dir} has no checkpoint (no complete round); start it again without --resume")
    info = json.loads((folder / LATEST).read_text())
    head = load_file(str(folder / info["head"])) if info["head"] else None
    server = info.get("server")
    return Checkpoint(info, read_state(folder / info["method"]), head, read_state(folder / server) if server else None)


def atomic_write(path: Path, write) -> None:
    """``write(partial)``, then rename the partial file to ``path``: a reader sees the old file or the new one."""
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)
