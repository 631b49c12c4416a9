"""The GPU check: fedray's worker-side code on a GPU machine without Ray, MLflow or datasets.

Two steps. ``prepare`` runs here and writes a bundle of at most ~55 MB that the GPU machine
can take: MiniLM in float16 (its tokenizer and pooling config too), a Rotten Tomatoes
extract and the wheels of pydantic (the only package fedray's worker side needs beyond
torch, transformers, peft, pandas and scikit-learn). ``run`` runs there:

1. quickstart clients one at a time on the GPU, and the same clients on the CPU: train
   loss within ``LOSS_TOLERANCE`` (TF32 off), seconds and tokens per second on each;
2. four processes sharing the GPU at once (what ``resources.num_gpus: 0.25`` does), each
   training clients: GPU memory per process and the wall time against one process;
3. a Llama-shaped ~1B model built from its config with random weights, in bfloat16, with
   and without activation checkpointing, at sequence lengths 128 and 512: peak GPU
   memory and seconds per step.

It writes ``results.json`` and ``results.md`` into ``--out``.

    python benchmarks/gpu/check.py prepare --bundle /tmp/gpu-bundle        # here
    python benchmarks/gpu/check.py run --bundle /tmp/gpu-bundle --out OUT  # there (installs the wheels first)
    python benchmarks/gpu/check.py run --bundle /tmp/gpu-bundle --out OUT --smoke --device cpu  # CI: < 1 min
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: |GPU loss - CPU loss| allowed for the same client (float32, TF32 off; reduction order differs).
LOSS_TOLERANCE = 1e-3
#: Packages fedray's worker side imports that a bare torch + transformers machine may lack.
WHEELS = ["pydantic", "pydantic-core", "annotated-types", "typing-inspection"]
#: Rotten Tomatoes examples in the extract.
TRAIN_EXAMPLES, TEST_EXAMPLES = 2000, 200
#: A Llama of about 1.07B parameters (TinyLlama's shape, 22 layers cut to 16).
BILLION = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 4, "vocab_size": 32000}  # fmt: skip
SMOKE_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 32000}  # fmt: skip


# ---------------------------------------------------------------------- prepare (here)


def prepare(bundle: Path, python_version: str, wheels: bool = True) -> None:
    """Write the bundle the GPU machine takes."""
    import torch
    from safetensors.torch import load_file, save_file

    from fedray.data import load_dataset
    from fedray.models import ModelSpec, load_base

    shutil.rmtree(bundle, ignore_errors=True)
    model_dir = bundle / "minilm-fp16"
    source = Path(load_base(ModelSpec("minilm", "classification", num_labels=2)).source)
    shutil.copytree(source, model_dir, ignore=shutil.ignore_patterns("*.safetensors", "README.md", "data_config.json"))
    weights = {k: v.to(torch.float16).contiguous() for k, v in load_file(str(source / "model.safetensors")).items()}
    save_file(weights, str(model_dir / "model.safetensors"))

    split = load_dataset("rotten_tomatoes", split_seed=0)
    extract = {
        name: {"texts": part.texts[:size], "labels": part.labels[:size], "label_names": part.label_names}
        for name, part, size in (("train", split.train, TRAIN_EXAMPLES), ("test", split.test, TEST_EXAMPLES))
    }
    (bundle / "rotten_tomatoes.json").write_text(json.dumps(extract))
    if wheels:  # the smoke test skips them: its machine has pydantic
        _download_wheels(bundle / "wheels", python_version)
    size = sum(path.stat().st_size for path in bundle.rglob("*") if path.is_file())
    print(f"bundle {bundle}: {size / 2**20:.1f} MiB")


def _download_wheels(folder: Path, python_version: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--python-version", python_version, "--platform", "manylinux_2_17_x86_64", "-d", str(folder), *WHEELS],
        check=True,
    )  # fmt: skip


# --------------------------------------------------------------------------- run (there)


def ensure_packages(bundle: Path) -> None:
    """Install the bundle's wheels into a folder on sys.path if pydantic is missing."""
    try:
        import pydantic  # noqa: F401
    except ImportError:
        target = bundle / "site"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target", str(target),
             *map(str, sorted((bundle / "wheels").glob("*.whl")))],
            check=True,
        )  # fmt: skip
        sys.path.insert(0, str(target))


def _dataset(bundle: Path, part: str):
    from fedray.data import TextDataset

    raw = json.loads((bundle / "rotten_tomatoes.json").read_text())[part]
    return TextDataset("rotten_tomatoes", "classification", raw["texts"], labels=raw["labels"],
                       label_names=raw["label_names"])  # fmt: skip


def _shared_minilm(bundle: Path):
    from fedray.models import ModelSpec, export_base, load_base

    base = load_base(ModelSpec(str(bundle / "minilm-fp16"), "classification", num_labels=2, dtype="float32"))
    return base, export_base(base)


def _train_settings(steps: int, seq_len: int, batch_size: int, checkpointing: bool = False):
    from fedray.config import TrainSpec

    return TrainSpec(local_steps=steps, batch_size=batch_size, lr=1e-3, max_seq_len=seq_len,
                     gradient_checkpointing=checkpointing)  # fmt: skip


def _clients(bench, base, shards, settings, device_type: str):
    """Train each shard as one quickstart client; per client: loss, seconds, tokens per second."""
    import torch

    from fedray.methods import create_method
    from fedray.models import head_state

    rows = []
    for index, shard in enumerate(shards):
        method = create_method("fedplora", bench.layers, 16, scale=2.0, seed=index)
        if device_type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = bench.train(method.client_init(0, 8), shard, settings, head=head_state(base.model), seed=index)
        if device_type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        tokens = settings.local_steps * settings.batch_size * settings.max_seq_len
        rows.append({"client": index, "train_loss": result.metrics["train_loss"], "seconds": seconds,
                     "tokens_per_s": tokens / seconds})  # fmt: skip
    return rows


def _shards(bundle: Path, count: int, size: int):
    import numpy as np

    train = _dataset(bundle, "train")
    return [train.subset(np.arange(i * size, (i + 1) * size)) for i in range(count)]


def quickstart_clients(bundle: Path, device: str, count: int, steps: int) -> dict:
    """The same clients on ``device`` and on the CPU: losses must agree."""
    import torch

    from fedray.worker.workbench import Workbench

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    base, shared = _shared_minilm(bundle)
    settings = _train_settings(steps, seq_len=64, batch_size=16)
    shards = _shards(bundle, count, 160)
    on_device = _clients(Workbench(shared, device=device), base, shards, settings, torch.device(device).type)
    on_device_memory = torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None
    on_cpu = _clients(Workbench(shared, device="cpu"), base, shards, settings, "cpu")
    gaps = [abs(a["train_loss"] - b["train_loss"]) for a, b in zip(on_device, on_cpu, strict=True)]
    return {"device": on_device, "cpu": on_cpu, "loss_gap_max": max(gaps), "loss_tolerance": LOSS_TOLERANCE,
            "losses_agree": max(gaps) <= LOSS_TOLERANCE, "device_peak_bytes": on_device_memory}  # fmt: skip


def _sharing_worker(bundle: str, device: str, count: int, steps: int, queue) -> None:
    import torch

    from fedray.worker.workbench import Workbench

    torch.set_num_threads(1)
    base, shared = _shared_minilm(Path(bundle))
    started = time.perf_counter()
    rows = _clients(Workbench(shared, device=device), base, _shards(Path(bundle), count, 160),
                    _train_settings(steps, 64, 16), torch.device(device).type)  # fmt: skip
    peak = torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None
    queue.put({"pid": os.getpid(), "seconds": time.perf_counter() - started, "clients": rows, "peak_bytes": peak})


def shared_gpu(bundle: Path, device: str, processes: int, count: int, steps: int) -> dict:
    """``processes`` processes training ``count`` clients each at once on one device."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    started = time.perf_counter()
    workers = [context.Process(target=_sharing_worker, args=(str(bundle), device, count, steps, queue))
               for _ in range(processes)]  # fmt: skip
    for worker in workers:
        worker.start()
    results = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    return {"processes": processes, "wall_s": time.perf_counter() - started, "per_process": results}


def billion(bundle: Path, device: str, shape: dict, seq_lens: list[int], steps: int) -> list[dict]:
    """A Llama built from its config (random weights, bfloat16): memory and seconds per step."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from fedray.methods import create_method
    from fedray.models import ModelSpec, export_base, load_base
    from fedray.worker.workbench import Workbench

    folder = bundle.parent / f"{bundle.name}-llama"
    shutil.rmtree(folder, ignore_errors=True)
    config = LlamaConfig(**shape, num_labels=2, pad_token_id=0, max_position_embeddings=1024)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).to(torch.bfloat16).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(bundle / "minilm-fp16" / name, folder / name)  # a BERT tokenizer: ids < 32000 fit
    base = load_base(ModelSpec(str(folder), "classification", num_labels=2, dtype="bfloat16"))
    parameters = sum(p.numel() for p in base.model.parameters())
    bench = Workbench(export_base(base), device=device)
    train = _dataset(bundle, "train")
    long_texts = [" ".join(train.texts[i : i + 12]) for i in range(0, 12 * 64, 12)]  # long enough for 512 tokens
    from fedray.data import TextDataset

    shard = TextDataset("long", "classification", long_texts, labels=[i % 2 for i in range(len(long_texts))])
    rows = []
    for seq_len in seq_lens:
        for checkpointing in (False, True):
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            method = create_method("fedit", bench.layers, 16, scale=2.0, seed=0)
            settings = _train_settings(steps, seq_len, batch_size=4, checkpointing=checkpointing)
            started = time.perf_counter()
            result = bench.train(method.client_init(0, 16), shard.subset(np.arange(4 * steps)), settings, seed=0)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            rows.append({
                "parameters": parameters, "seq_len": seq_len, "checkpointing": checkpointing,
                "s_per_step": (time.perf_counter() - started) / steps,
                "peak_bytes": torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None,
                "train_loss": result.metrics["train_loss"],
            })  # fmt: skip
    shutil.rmtree(folder, ignore_errors=True)
    return rows


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _mib(value: int | None) -> str:
    return "—" if value is None else f"{value / 2**20:.0f}"


def report(results: dict) -> str:
    quick, shared = results["quickstart"], results["shared"]
    lines = [f"# GPU check on {results['device_name']}", ""]
    lines += [f"torch {results['torch']}, transformers {results['transformers']}, peft {results['peft']}", ""]
    lines += ["## Quickstart clients, one at a time", ""]
    pairs = zip(quick["device"], quick["cpu"], strict=True)
    rows = [[a["client"], f"{a['train_loss']:.5f}", f"{b['train_loss']:.5f}", f"{a['seconds']:.2f}",
             f"{b['seconds']:.2f}", f"{a['tokens_per_s']:.0f}"] for a, b in pairs]  # fmt: skip
    header = ["client", "loss (device)", "loss (CPU)", "s (device)", "s (CPU)", "tokens/s (device)"]
    lines += _table(header, rows)
    verdict = "agree" if quick["losses_agree"] else "DISAGREE"
    lines += ["", f"Largest loss gap {quick['loss_gap_max']:.2e} (tolerance {LOSS_TOLERANCE:.0e}): {verdict}.", ""]
    lines += [f"## {shared['processes']} processes sharing the device", "", f"Wall time {shared['wall_s']:.1f} s.", ""]
    rows = [[row["pid"], f"{row['seconds']:.1f}", _mib(row["peak_bytes"])] for row in shared["per_process"]]
    lines += _table(["process", "seconds", "peak memory (MiB)"], rows)
    lines += ["", "## Llama-shaped model from its config, bfloat16", ""]
    rows = [[f"{row['parameters'] / 1e6:,.0f}M", row["seq_len"], row["checkpointing"], f"{row['s_per_step']:.3f}",
             _mib(row["peak_bytes"])] for row in results["billion"]]  # fmt: skip
    lines += _table(["parameters", "seq len", "checkpointing", "s/step", "peak memory (MiB)"], rows)
    return "\n".join(lines) + "\n"


def run(bundle: Path, out: Path, device: str, smoke: bool) -> dict:
    ensure_packages(bundle)
    sys.path.insert(0, str(REPO))
    import peft
    import torch
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "CPU"
    results = {"device_name": name, "torch": torch.__version__, "transformers": transformers.__version__,
               "peft": peft.__version__, "smoke": smoke}  # fmt: skip
    results["quickstart"] = quickstart_clients(bundle, device, count=1 if smoke else 4, steps=1 if smoke else 10)
    results["shared"] = shared_gpu(bundle, device, processes=2 if smoke else 4, count=1 if smoke else 3,
                                   steps=1 if smoke else 10)  # fmt: skip
    results["billion"] = billion(bundle, device, SMOKE_LLAMA if smoke else BILLION,
                                 [32] if smoke else [128, 512], steps=1 if smoke else 3)  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(report(results))
    print(report(results))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["prepare", "run"])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI on a CPU (under a minute)")
    parser.add_argument("--python-version", default="3.12", help="prepare: the GPU machine's Python, for the wheels")
    parser.add_argument("--no-wheels", action="store_true", help="prepare: leave the wheels out")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.bundle, args.python_version, wheels=not args.no_wheels)
    else:
        results = run(args.bundle, args.out, args.device, args.smoke)
        if not results["quickstart"]["losses_agree"]:
            sys.exit(1)


if __name__ == "__main__":
    main()
