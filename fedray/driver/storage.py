"""Run directories (and sweep folders) on object storage (``s3://``, ``gs://``, any fsspec URI).

The driver works in a local staging folder exactly as it does for a local run directory,
and copies the run up as it goes: at the start its spec and partition, after each round
that round's checkpoint objects and then, last, the round's manifest (``checkpoint/
round-NNNNNN.json``, naming the objects) and ``metrics.jsonl``; at the end the adapter and
figures. Object stores have no atomic rename, but a single object appears whole or not at
all: a checkpoint counts once its manifest exists, so a driver lost mid-upload leaves the
previous complete round as the newest. Resuming downloads the newest complete manifest's
objects into a fresh staging folder and continues there.

The filesystems are optional extras (``pip install 'fedray[s3]'`` or ``[gcs]``); endpoint
and credentials come from the filesystem's usual environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from fedray.driver.checkpoint import CHECKPOINT_DIR, KEEP_ROUNDS, LATEST

#: The pip extra that installs each protocol's filesystem.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure"}
#: Where staging folders of remote run directories live.
STAGING_ROOT = Path.home() / ".cache" / "fedray" / "staging"
#: What a run directory holds after a start that failed before its first round (a plain
#: re-run writes over it), and what the start of a remote run copies up.
START_FILES = ("spec.yaml", "partition.json")


def is_remote(location: str | Path) -> bool:
    """Whether ``location`` names a run directory on a remote filesystem (``proto://...``)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


class RemoteRunDir:
    """A run directory at ``uri``, staged in a local folder."""

    def __init__(self, uri: str, staging_root: Path = STAGING_ROOT) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.root = _filesystem(self.uri)
        digest = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
        self.local = staging_root / digest

    def __str__(self) -> str:
        return self.uri

    def child(self, relative: str) -> RemoteRunDir:
        """The remote folder ``relative`` inside this one (a sweep's cell)."""
        return RemoteRunDir(f"{self.uri}/{relative}", self.local.parent)

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    # ------------------------------------------------------------------- reads

    def holds_run(self) -> bool:
        """Whether anything but the files of a start that failed early is there."""
        self.fs.invalidate_cache()  # another process (a killed driver) may have written since
        if not self.fs.exists(self.root):
            return False
        names = {path.rstrip("/").rsplit("/", 1)[-1] for path in self.fs.ls(self.root, detail=False)}
        return bool(names - set(START_FILES))

    def newest_manifest(self) -> dict[str, Any] | None:
        """The newest checkpoint manifest whose objects all exist, or None."""
        self.fs.invalidate_cache()
        folder = f"{self.root}/{CHECKPOINT_DIR}"
        if not self.fs.exists(folder):
            return None
        manifests = sorted(self.fs.glob(f"{folder}/round-*.json"), reverse=True)
        for path in manifests:
            manifest = json.loads(self.fs.cat_file(path))
            if all(self.fs.exists(f"{folder}/{name}") for name in _objects(manifest)):
                return manifest
        return None

    def stage_for_resume(self) -> Path:
        """A fresh staging folder holding the run's spec, metrics and newest complete checkpoint."""
        manifest = self.newest_manifest()
        if manifest is None:
            raise FileNotFoundError(f"{self.uri} has no complete checkpoint; start it again without --resume")
        self.stage_files([*START_FILES, "metrics.jsonl"])
        folder = self.local / CHECKPOINT_DIR
        folder.mkdir(parents=True)
        for name in _objects(manifest):
            self.fs.get_file(f"{self.root}/{CHECKPOINT_DIR}/{name}", str(folder / name))
        (folder / LATEST).write_text(json.dumps(manifest, indent=1))
        return self.local

    def stage_files(self, names: list[str]) -> Path:
        """A fresh staging folder holding those of ``names`` that exist remotely (a sweep's own files)."""
        self._fresh_local()
        self.fs.invalidate_cache()
        for name in names:
            if self.fs.exists(f"{self.root}/{name}"):
                self.fs.get_file(f"{self.root}/{name}", str(self.local / name))
        return self.local

    # ------------------------------------------------------------------ writes

    def clear(self) -> None:
        """Delete the remote folder (a run cut off before its first checkpoint, started over)."""
        self.fs.invalidate_cache()
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)

    def stage_new(self) -> Path:
        """An empty staging folder for a run that starts."""
        self._fresh_local()
        return self.local

    def upload_start(self) -> None:
        for name in START_FILES:
            self.put(name)

    def upload_round(self, round_index: int) -> None:
        """Round ``round_index``'s checkpoint objects, then its manifest, then ``metrics.jsonl``;
        older rounds' objects go (manifest first, so no manifest names a missing object)."""
        local = self.local / CHECKPOINT_DIR
        manifest = json.loads((local / LATEST).read_text())
        assert manifest["round"] == round_index, (manifest["round"], round_index)
        for name in _objects(manifest):
            self.put(f"{CHECKPOINT_DIR}/{name}")
        self.fs.pipe_file(f"{self.root}/{CHECKPOINT_DIR}/{_manifest_name(round_index)}", json.dumps(manifest).encode())
        self.put("metrics.jsonl")
        for path in self.fs.glob(f"{self.root}/{CHECKPOINT_DIR}/round-*.json"):
            old_round = int(path.rsplit("/", 1)[-1].removeprefix("round-").removesuffix(".json"))
            if old_round <= round_index - KEEP_ROUNDS:
                old = json.loads(self.fs.cat_file(path))
                self.fs.rm_file(path)
                for name in _objects(old):
                    self.fs.rm_file(f"{self.root}/{CHECKPOINT_DIR}/{name}")

    def upload_outputs(self) -> None:
        """Everything the end of the run wrote besides checkpoints (adapter, figures, workers)."""
        for path in sorted(self.local.rglob("*")):
            relative = path.relative_to(self.local).as_posix()
            if path.is_file() and not relative.startswith(f"{CHECKPOINT_DIR}/"):
                self.put(relative)

    # --------------------------------------------------------------- internals

    def put(self, relative: str) -> None:
        """Copy the staged file ``relative`` up, if it exists."""
        source = self.local / relative
        if source.exists():
            self.fs.put_file(str(source), f"{self.root}/{relative}")

    def _fresh_local(self) -> None:
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)


def _objects(manifest: dict[str, Any]) -> list[str]:
    """The checkpoint objects a manifest (a ``latest.json`` record) names."""
    return [manifest[key] for key in ("method", "head", "server") if manifest.get(key)]


def _manifest_name(round_index: int) -> str:
    return f"round-{round_index:06d}.json"


def _filesystem(uri: str):
    """The fsspec filesystem of ``uri`` and the path inside it; one clear error if its
    package is missing."""
    import fsspec

    protocol = uri.split("://", 1)[0]
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError:
        extra = EXTRAS.get(protocol)
        hint = f"pip install 'fedray[{extra}]'" if extra else f"install the fsspec filesystem for {protocol}://"
        raise ValueError(f"run directory {uri}: the {protocol}:// filesystem is not installed; {hint}") from None
    except ValueError as error:
        raise ValueError(f"run directory {uri}: {protocol}:// is not a filesystem fsspec knows ({error})") from None
    return fs, path.rstrip("/")
