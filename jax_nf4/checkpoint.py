"""Loading safetensors checkpoints (Hugging Face model folders, bitsandbytes NF4) without PyTorch.

A checkpoint is one ``.safetensors`` file or a model folder: ``config.json`` (optional; its
``quantization_config`` is checked), and either ``model.safetensors.index.json`` with the shards
it names or every ``*.safetensors`` file of the folder. :class:`Checkpoint` is a lazy mapping of
tensor name -> read-only ``np.memmap`` over all shards; :func:`iter_checkpoint` groups the
tensors of each bitsandbytes 4-bit weight into one :class:`~jax_nf4.NF4Weight` and yields one
entry at a time; :func:`load_checkpoint` builds the nested-dict pytree. Memory: only headers are
read up front, and each entry is read, converted and handed over before the next one, so the
host memory in use beyond what the caller keeps is bounded by the largest tensor.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jax_nf4 import bnb
from jax_nf4._weight import NF4Weight
from jax_nf4.safetensors_io import CheckpointError, SafetensorsFile

__all__ = ["CheckpointError", "Checkpoint", "Entry", "iter_checkpoint", "load_checkpoint",
           "unflatten", "INDEX_NAME", "CONFIG_NAME"]

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"cannot read the {what}: {e.strerror or e}", path=path) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupted {what}: the JSON does not parse ({e})",
                              path=path) from None


def check_quantization_config(config: Mapping[str, Any] | None, path: Any) -> dict | None:
    """Checks ``config["quantization_config"]``: absent, or bitsandbytes NF4 4-bit."""
    if not config or config.get("quantization_config") is None:
        return None
    qc = config["quantization_config"]
    if not isinstance(qc, dict):
        raise CheckpointError("quantization_config is not an object", path=path,
                              key="quantization_config")
    method = qc.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise CheckpointError(f"quant_method {method!r} is not supported (bitsandbytes NF4 only)",
                              path=path, key="quantization_config.quant_method")
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise CheckpointError("8-bit (LLM.int8) checkpoints are not supported (NF4 4-bit only)",
                              path=path, key="quantization_config.load_in_8bit")
    qt = qc.get("bnb_4bit_quant_type", "fp4" if qc.get("load_in_4bit") else None)
    if qt is not None and qt != "nf4":
        raise CheckpointError(f"bnb_4bit_quant_type {qt!r} is not supported: jax_nf4 reads NF4 "
                              "only (FP4 has another codebook)", path=path,
                              key="quantization_config.bnb_4bit_quant_type")
    return qc


@dataclass
class Entry:
    """One item of a checkpoint: a dense tensor or a bitsandbytes 4-bit weight and its keys."""

    name: str
    kind: str  # "dense", "nf4" or "fp4"
    keys: list[str] = field(default_factory=list)


class Checkpoint(Mapping[str, np.ndarray]):
    """A lazy, read-only mapping of tensor name -> ``np.memmap`` over a file or model folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config: dict[str, Any] | None = None
        self.index: dict[str, Any] | None = None
        if self.path.is_file():
            files = [self.path]
        elif self.path.is_dir():
            cfg = self.path / CONFIG_NAME
            if cfg.is_file():
                self.config = _read_json(cfg, "config.json")
                if not isinstance(self.config, dict):
                    raise CheckpointError("config.json is not a JSON object", path=cfg)
            files = self._shard_paths()
        else:
            raise CheckpointError("no such file or directory", path=self.path)
        self.quantization_config = check_quantization_config(
            self.config, self.path / CONFIG_NAME)
        self.files = [SafetensorsFile(f) for f in files]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for key in f:
                if key in self._where:
                    raise CheckpointError(f"duplicate key: also in {self._where[key].path.name}",
                                          path=f.path, key=key)
                self._where[key] = f
        if self.index is not None:
            for key, shard in self.index["weight_map"].items():
                if key not in self._where or self._where[key].path.name != Path(shard).name:
                    raise CheckpointError(f"missing key: the index puts it in {shard} but that "
                                          "shard does not hold it", path=self.path / shard,
                                          key=key)

    def _shard_paths(self) -> list[Path]:
        index = self.path / INDEX_NAME
        if index.is_file():
            self.index = _read_json(index, "shard index")
            wm = self.index.get("weight_map") if isinstance(self.index, dict) else None
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise CheckpointError("corrupted shard index: no weight_map of name -> file",
                                      path=index, key="weight_map")
            shards = sorted(set(wm.values()))
            for s in shards:
                if not (self.path / s).is_file():
                    raise CheckpointError("missing shard file named by the index",
                                          path=self.path / s)
            return [self.path / s for s in shards]
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError("no *.safetensors files in the folder", path=self.path)
        return files

    # Mapping interface -------------------------------------------------------------------
    def __getitem__(self, key: str) -> np.ndarray:
        try:
            f = self._where[key]
        except KeyError:
            raise KeyError(key) from None
        return f.get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.files)} files, {len(self)} tensors)"

    def source_of(self, key: str) -> Path:
        """The file holding ``key`` (the checkpoint's path when no file does)."""
        f = self._where.get(key)
        return f.path if f is not None else self.path

    def info(self, key: str):
        return self._where[key].info(key)

    def read_bytes(self, key: str) -> bytes:
        return self._where[key].read_bytes(key)

    # ------------------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        """Dense tensors and 4-bit weights (with their keys), in file order."""
        quant: dict[str, str] = {}
        for key in self._where:
            for kind, suffix in (("nf4", bnb.QUANT_STATE_SUFFIX),
                                 ("fp4", "quant_state.bitsandbytes__fp4")):
                if key.endswith("." + suffix):
                    quant[key[: -len(suffix) - 1]] = kind
        consumed: set[str] = set()
        out: list[Entry] = []
        for w, kind in quant.items():
            keys = [k for k in [w] + [f"{w}.{s}" for s in bnb.AUX_SUFFIXES] if k in self._where]
            consumed.update(keys)
            out.append(Entry(w, kind, keys))
        order = {k: i for i, k in enumerate(self._where)}
        for key in self._where:
            if key in consumed:
                continue
            base, _, suffix = key.rpartition(".")
            if suffix in ("absmax", "quant_map", "nested_absmax", "nested_quant_map") \
                    and base.endswith("weight") and base in self._where:
                raise CheckpointError(f"missing key {base}.{bnb.QUANT_STATE_SUFFIX}: {key} "
                                      "belongs to a bitsandbytes 4-bit weight whose quant state "
                                      "is not in the checkpoint", path=self.source_of(key),
                                      key=f"{base}.{bnb.QUANT_STATE_SUFFIX}")
            out.append(Entry(key, "dense", [key]))
        out.sort(key=lambda e: order.get(e.name, order[e.keys[-1]] if e.keys else 0))
        return out

    def load_entry(self, entry: Entry) -> NF4Weight | np.ndarray:
        """A dense tensor (read-only memmap) or an NF4Weight (NumPy leaves, layout A)."""
        if entry.kind == "fp4":
            key = f"{entry.name}.quant_state.bitsandbytes__fp4"
            raise CheckpointError("FP4 weights are not supported: jax_nf4 reads NF4 only",
                                  path=self.source_of(key), key=key)
        if entry.kind == "nf4":
            return bnb.weight_from_bnb(self, entry.name, source=self.path)
        return self[entry.name]


def _to_jax(value: Any) -> Any:
    return jax.tree.map(jnp.asarray, value)


def iter_checkpoint(path: str | os.PathLike | Checkpoint, *, to_jax: bool = False
                    ) -> Iterator[tuple[str, NF4Weight | Any]]:
    """Yields ``(name, value)`` one entry at a time: an :class:`NF4Weight` for each bitsandbytes
    NF4 weight (named by its ``.weight`` key), the tensor itself otherwise. Values are NumPy
    (dense tensors as read-only memmaps) or, with ``to_jax=True``, jax arrays."""
    ck = path if isinstance(path, Checkpoint) else Checkpoint(path)
    for entry in ck.entries():
        value = ck.load_entry(entry)
        yield entry.name, (_to_jax(value) if to_jax else value)


def unflatten(flat: Mapping[str, Any], *, source: Any = None) -> dict[str, Any]:
    """``{"a.b.c": x}`` -> ``{"a": {"b": {"c": x}}}`` (module paths as nested dicts)."""
    root: dict[str, Any] = {}
    for name, value in flat.items():
        parts = name.split(".")
        node = root
        for i, p in enumerate(parts[:-1]):
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise CheckpointError(f"{'.'.join(parts[: i + 1])!r} is both a tensor and a "
                                      "module", path=source, key=name)
            node = nxt
        if parts[-1] in node:
            raise CheckpointError("is both a tensor and a module", path=source, key=name)
        node[parts[-1]] = value
    return root


def load_checkpoint(path: str | os.PathLike, *, to_jax: bool = True, nested: bool = True
                    ) -> dict[str, Any]:
    """Loads a checkpoint (file or model folder) into a pytree.

    Returns a nested dict by module path (``nested=False``: a flat dict by tensor name) of
    :class:`NF4Weight` (for the bitsandbytes NF4 weights, plain or double-quantized, in layout
    A) and dense arrays. With ``to_jax=True`` every value is a jax array, moved to the default
    device entry by entry; with ``to_jax=False`` the values stay NumPy, dense tensors as lazy
    read-only memmaps. Raises :class:`CheckpointError` for FP4 or 8-bit checkpoints, missing
    keys or shards, shape mismatches, corrupted JSON and truncated files.
    """
    ck = Checkpoint(path)
    flat = dict(iter_checkpoint(ck, to_jax=to_jax))
    return unflatten(flat, source=ck.path) if nested else flat
