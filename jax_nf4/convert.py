"""Quantizing a dense safetensors checkpoint into a bitsandbytes / Hugging Face NF4 checkpoint.

:func:`quantize_checkpoint` streams tensor by tensor (memory bounded by the largest tensor),
quantizes the 2-D ``*.weight`` matrices with :func:`jax_nf4.quantize` on the CPU and writes them
with bitsandbytes' keys (:mod:`jax_nf4.bnb`); other tensors are copied. For a model folder it also
writes ``config.json`` with the ``quantization_config`` transformers reads (unquantized linear
layers are listed in ``llm_int8_skip_modules``), the shard index, and copies every other file.
The destination appears only when complete: everything is written to a temporary name in the
same directory and renamed at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import jax
import numpy as np

from jax_nf4 import bnb
from jax_nf4.checkpoint import CONFIG_NAME, INDEX_NAME, Checkpoint
from jax_nf4.ops import quantize
from jax_nf4.safetensors_io import CheckpointError, SafetensorsWriter

__all__ = ["DEFAULT_SKIP", "QuantizeReport", "quantize_checkpoint", "quantization_config"]

#: Regular expressions (searched in tensor names) of weights left dense by default: embeddings,
#: norms and the output head, as bitsandbytes / transformers do.
DEFAULT_SKIP = (r"embed", r"lm_head", r"norm", r"(^|\.)wte\.", r"(^|\.)wpe\.", r"(^|\.)ln_\w*\.")

_QUANTIZABLE = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(jax.numpy.bfloat16)}
_BLOCKSIZES = bnb.BLOCKSIZES


@dataclass
class QuantizeReport:
    """What :func:`quantize_checkpoint` did."""

    quantized: list[str] = field(default_factory=list)
    dense: list[str] = field(default_factory=list)
    skipped_linear: list[str] = field(default_factory=list)  # 2-D weights left dense
    bytes_in: int = 0
    bytes_out: int = 0


def quantization_config(double_quant: bool, compute_dtype: str,
                        skip_modules: Sequence[str]) -> dict:
    """The ``quantization_config`` transformers writes for a bitsandbytes NF4 model."""
    return {
        "_load_in_4bit": True, "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": bool(double_quant),
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": list(skip_modules) or None, "llm_int8_threshold": 6.0,
        "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
    }


def _why_dense(name: str, info, block_size: int, skip: Sequence[re.Pattern]) -> str | None:
    """None if the tensor is to be quantized, else the reason it stays dense."""
    if not name.endswith(".weight") and name != "weight":
        return "not a weight"
    if len(info.shape) != 2:
        return f"{len(info.shape)}-D"
    if info.dtype not in _QUANTIZABLE:
        return f"dtype {info.dtype_name}"
    for pat in skip:
        if pat.search(name):
            return f"matches {pat.pattern!r}"
    n, k = info.shape
    if n % 2 or k % block_size or n * k == 0:
        return f"shape {list(info.shape)} does not fit (N even, K multiple of {block_size})"
    return None


def _commit_dir(tmp: Path, dst: Path) -> None:
    if dst.exists() or dst.is_symlink():
        backup = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        backup.rmdir()
        os.rename(dst, backup)
        try:
            os.rename(tmp, dst)
        except BaseException:
            os.rename(backup, dst)
            raise
        if backup.is_dir() and not backup.is_symlink():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            backup.unlink(missing_ok=True)
    else:
        os.rename(tmp, dst)


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, block_size: int = 64,
                        double_quant: bool = False, skip: Iterable[str] = (),
                        default_skip: bool = True, force: bool = False,
                        progress: Callable[[str], None] | None = None) -> QuantizeReport:
    """Quantizes the dense checkpoint ``src`` (a ``.safetensors`` file or a model folder) into
    a bitsandbytes NF4 checkpoint at ``dst``.

    A folder (or a file given with a ``dst`` not ending in ``.safetensors``) gives a folder: the
    same shard names, ``config.json`` with ``quantization_config``, the shard index, and copies of
    the other files. A file with ``dst`` ending in ``.safetensors`` gives one file.

    Args:
      block_size: NF4 block size, one of bitsandbytes' 32 ... 4096 (64 by default).
      double_quant: double-quantize the block scales (``bnb_4bit_use_double_quant``).
      skip: regular expressions (``re.search`` on tensor names) of weights to leave dense, in
        addition to :data:`DEFAULT_SKIP` (unless ``default_skip=False``).
      force: replace an existing ``dst``.
      progress: called with one line of text per tensor.
    """
    if block_size not in _BLOCKSIZES:
        raise ValueError(f"block size {block_size} is not one of bitsandbytes' {_BLOCKSIZES}")
    src, dst = Path(src), Path(dst)
    patterns = []
    for p in [*(DEFAULT_SKIP if default_skip else ()), *skip]:
        try:
            patterns.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"--skip {p!r} is not a regular expression: {e}") from None
    ck = Checkpoint(src)
    if ck.quantization_config is not None or any(
            k.endswith(".quant_state.bitsandbytes__nf4") or k.endswith(
                ".quant_state.bitsandbytes__fp4") for k in ck):
        raise CheckpointError("already quantized: the source holds bitsandbytes 4-bit weights",
                              path=src)
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists (use --force to replace it)")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ValueError(f"the destination {dst} must not be the source or inside it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    as_file = src.is_file() and dst.suffix == ".safetensors"
    say = progress or (lambda line: None)
    report = QuantizeReport()
    cpu = jax.devices("cpu")[0]
    all_keys = [(f, name) for f in ck.files for name in f]
    total = len(all_keys)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        weight_map: dict[str, str] = {}
        step = 0
        for f in ck.files:
            out_name = f.path.name if not src.is_file() else "model.safetensors"
            out_path = tmp / out_name
            metadata = dict(f.metadata)
            metadata.setdefault("format", "pt")
            with SafetensorsWriter(out_path, metadata) as w:
                for name in f:
                    step += 1
                    info = f.info(name)
                    report.bytes_in += info.nbytes
                    why = _why_dense(name, info, block_size, patterns)
                    if why is None:
                        with jax.default_device(cpu):
                            q = quantize(jax.numpy.asarray(f.get(name)), block_size,
                                         double_quant=double_quant)
                            tensors = bnb.weight_to_bnb(q, name)
                        report.quantized.append(name)
                        say(f"[{step}/{total}] {name} {info.dtype_name}{list(info.shape)} -> nf4"
                            f"{' (double quant)' if double_quant else ''}, block {block_size}")
                    else:
                        tensors = {name: f.get(name)}
                        report.dense.append(name)
                        if len(info.shape) == 2 and name.endswith(".weight"):
                            report.skipped_linear.append(name)
                        say(f"[{step}/{total}] {name} {info.dtype_name}{list(info.shape)} "
                            f"-> copied ({why})")
                    for key, arr in tensors.items():
                        w.add(key, arr)
                        weight_map[key] = out_name
                        report.bytes_out += arr.size * arr.dtype.itemsize
        if as_file:
            final = tmp / "model.safetensors"
            tmp_file = dst.parent / f"{tmp.name}.safetensors"
            os.rename(final, tmp_file)
            try:
                if dst.is_dir() and not dst.is_symlink():
                    _commit_dir(tmp_file, dst)
                else:
                    os.replace(tmp_file, dst)
            finally:
                tmp_file.unlink(missing_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
            return report
        if ck.index is not None or len(ck.files) > 1:
            index = {"metadata": {"total_size": report.bytes_out},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if ck.config is not None or src.is_dir():
            config = dict(ck.config or {})
            compute = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
            if not isinstance(compute, str):
                compute = "bfloat16"
            skip_modules = [n[: -len(".weight")] for n in report.skipped_linear]
            config["quantization_config"] = quantization_config(double_quant, compute,
                                                                skip_modules)
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        if src.is_dir():
            written = {p.name for p in tmp.iterdir()}
            for p in src.iterdir():
                if p.name in written or p.name == INDEX_NAME or p.suffix == ".safetensors":
                    continue
                if p.is_dir():
                    shutil.copytree(p, tmp / p.name, symlinks=True)
                else:
                    shutil.copy2(p, tmp / p.name)
        _commit_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
