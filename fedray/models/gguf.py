"""GGUF conversion: a built-in GGUF model is dequantised once into a cached safetensors folder."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer


def _converted_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """A safetensors folder converted from ``gguf_path`` (done once; later calls reuse it)."""
    folder = cache_dir / "converted" / gguf_path.stem
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.partial"
    staging.mkdir()
    try:
        _convert_gguf(gguf_path, staging)
        try:
            # Atomic: a killed conversion leaves only a staging folder, never a half cache.
            staging.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
            # Another process finished the same conversion first; its copy is as good.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _convert_gguf(gguf_path: Path, folder: Path) -> None:
    """Dequantise a GGUF causal LM and its tokenizer into a plain transformers folder."""
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are dequantised in memory; saving them as plain weights needs the GGUF marks gone.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
