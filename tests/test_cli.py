"""The jax-nf4 command line end to end on a multi-shard model folder made here: quantize, inspect,
load back, exit codes, --force, and no half-written destination after a failure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

import jax_nf4
from jax_nf4 import NF4Weight, convert
from jax_nf4.checkpoint import Checkpoint, load_checkpoint
from jax_nf4.cli import main
from jax_nf4.safetensors_io import SafetensorsFile, save_file

BF16 = ml_dtypes.bfloat16
FIXTURE_MODEL = Path(__file__).resolve().parent / "fixtures" / "bnb_model"


def make_model(root: Path, rng: np.random.Generator) -> tuple[Path, dict[str, np.ndarray]]:
    """A dense two-shard Llama-like folder: config, index, tokenizer files, a subfolder."""
    src = root / "dense"
    src.mkdir()
    shard1 = {
        "model.embed_tokens.weight": rng.standard_normal((32, 128)).astype(BF16),
        "model.layers.0.input_layernorm.weight": np.ones(128, BF16),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((128, 128)).astype(BF16),
        "model.layers.0.self_attn.q_proj.bias": rng.standard_normal(128).astype(BF16),
        "model.layers.0.self_attn.o_proj.weight": rng.standard_normal((128, 128)).astype(BF16),
    }
    shard2 = {
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((256, 128)).astype(np.float16),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((128, 256)).astype(np.float32),
        "model.layers.0.mlp.odd_proj.weight": rng.standard_normal((7, 128)).astype(BF16),
        "model.norm.weight": np.ones(128, BF16),
        "lm_head.weight": rng.standard_normal((32, 128)).astype(BF16),
        "rotary.inv_freq": np.arange(8, dtype=np.float32),
    }
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file(shard1, src / names[0], {"format": "pt"})
    save_file(shard2, src / names[1], {"format": "pt"})
    weight_map = {**{k: names[0] for k in shard1}, **{k: names[1] for k in shard2}}
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps({"model_type": "llama",
                                                 "torch_dtype": "bfloat16"}))
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "extra").mkdir()
    (src / "extra" / "notes.txt").write_text("kept")
    return src, {**shard1, **shard2}


@pytest.fixture
def model(tmp_path, rng):
    return make_model(tmp_path, rng)


QUANTIZED = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight",
             "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"]


def u8(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a)).reshape(-1).view(np.uint8)


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("options", [[], ["--double-quant", "--block-size", "128"]],
                         ids=["plain-64", "double-quant-128"])
def test_quantize_inspect_and_load_back(tmp_path, model, capsys, options):
    src, dense = model
    dst = tmp_path / "nf4"
    rc, out, err = run(capsys, "quantize", src, dst, *options)
    assert rc == 0, err
    assert err.count("\n") == len(dense) + 1 and "done: 4 weights quantized" in err
    double_quant = "--double-quant" in options
    block = 128 if options else 64
    # the folder: same shards, index, config with quantization_config, other files copied
    assert sorted(p.name for p in dst.iterdir()) == sorted(
        ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
         "model.safetensors.index.json", "tokenizer.json", "extra"])
    assert (dst / "extra" / "notes.txt").read_text() == "kept"
    config = json.loads((dst / "config.json").read_text())
    qc = config["quantization_config"]
    assert config["model_type"] == "llama" and qc["quant_method"] == "bitsandbytes"
    assert qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["bnb_4bit_use_double_quant"] is double_quant
    assert qc["bnb_4bit_compute_dtype"] == "bfloat16"
    assert sorted(qc["llm_int8_skip_modules"]) == ["lm_head", "model.embed_tokens",
                                                    "model.layers.0.mlp.odd_proj"]
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    for key, shard in index["weight_map"].items():
        assert key in SafetensorsFile(dst / shard)
    assert index["metadata"]["total_size"] == sum(
        SafetensorsFile(p).data_nbytes for p in dst.glob("*.safetensors"))
    # loads back to exactly jax_nf4.quantize of the same tensors
    flat = load_checkpoint(dst, nested=False, to_jax=False)
    assert set(flat) == set(dense)
    for name, value in flat.items():
        if name in QUANTIZED:
            mine = jax_nf4.quantize(dense[name], block, double_quant=double_quant)
            assert isinstance(value, NF4Weight) and value.double_quant == double_quant
            assert (value.shape, value.block_size, value.dtype) == (
                mine.shape, mine.block_size, mine.dtype)
            for a, b in zip(jax.tree.leaves(value), jax.tree.leaves(mine)):
                np.testing.assert_array_equal(u8(a), u8(b))
        else:
            assert value.dtype == dense[name].dtype
            np.testing.assert_array_equal(u8(value), u8(dense[name]))
    tree = load_checkpoint(dst)
    assert isinstance(tree["model"]["layers"]["0"]["mlp"]["up_proj"]["weight"], NF4Weight)
    # inspect
    rc, out, err = run(capsys, "inspect", dst)
    assert rc == 0 and err == ""
    fmt = "nf4+dq" if double_quant else "nf4"
    for name in QUANTIZED:
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        assert f" {fmt} " in line and f" {block} " in line
    assert "total: 4 NF4 layers" in out and "bitsandbytes nf4" in out
    rc, out, _ = run(capsys, "inspect", dst, "--json")
    rows = {r["name"]: r for r in json.loads(out)["entries"]}
    ck = Checkpoint(dst)
    for name in QUANTIZED:
        nbytes = sum(ck.info(k).nbytes for k in ck if k == name or k.startswith(name + "."))
        n, k = dense[name].shape
        assert rows[name]["bits_per_weight"] == 8 * nbytes / (n * k)
        assert rows[name]["format"] == fmt and rows[name]["block_size"] == block


def test_inspect_dense_and_bnb_made_checkpoints(capsys, model):
    src, dense = model
    rc, out, _ = run(capsys, "inspect", src)
    assert rc == 0 and "total: 0 NF4 layers" in out and f"{len(dense)} dense tensors" in out
    rc, out, _ = run(capsys, "inspect", FIXTURE_MODEL / "model-00001-of-00002.safetensors")
    assert rc == 0 and "nf4+dq" in out and "model.layers.0.self_attn.k_proj.weight" in out


def test_single_file_and_skip_patterns(tmp_path, model, capsys):
    src, dense = model
    one = tmp_path / "one.safetensors"
    save_file({k: dense[k] for k in QUANTIZED}, one)
    rc, _, err = run(capsys, "quantize", one, tmp_path / "out.safetensors", "--skip", "mlp\\.",
                     "--skip", "o_proj", "-q")
    assert rc == 0 and err == ""
    flat = load_checkpoint(tmp_path / "out.safetensors", nested=False, to_jax=False)
    assert isinstance(flat[QUANTIZED[0]], NF4Weight)
    assert all(not isinstance(flat[k], NF4Weight) for k in QUANTIZED[1:])
    rc, _, _ = run(capsys, "quantize", src, tmp_path / "all", "--no-default-skip", "-q")
    ck = Checkpoint(tmp_path / "all")
    assert "lm_head.weight.absmax" in ck and "model.embed_tokens.weight.absmax" in ck


def test_force_replaces_the_destination(tmp_path, model, capsys):
    src, _ = model
    dst = tmp_path / "nf4"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    rc, _, err = run(capsys, "quantize", src, dst, "-q")
    assert rc == 1 and err.count("\n") == 1 and "--force" in err and "exists" in err
    assert (dst / "old.txt").exists()
    rc, _, err = run(capsys, "quantize", src, dst, "-q", "--force")
    assert rc == 0, err
    assert not (dst / "old.txt").exists() and (dst / "config.json").exists()
    assert leftovers(tmp_path) == []


def test_a_failure_leaves_no_half_written_destination(tmp_path, model, capsys, monkeypatch):
    src, _ = model
    real = convert.bnb.weight_to_bnb
    calls = []

    def failing(q, name, **kw):
        calls.append(name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(q, name, **kw)

    monkeypatch.setattr(convert.bnb, "weight_to_bnb", failing)
    dst = tmp_path / "nf4"
    rc, _, err = run(capsys, "quantize", src, dst)
    assert rc == 1 and err.strip().splitlines()[-1] == \
        "jax-nf4 quantize: error: No space left on device"
    assert not dst.exists() and leftovers(tmp_path) == []
    # an existing destination survives a failed --force run untouched
    dst.mkdir()
    (dst / "keep.txt").write_text("keep")
    calls.clear()
    rc, _, _ = run(capsys, "quantize", src, dst, "--force", "-q")
    assert rc == 1 and sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("argv", [
    [], ["frobnicate"], ["quantize"], ["quantize", "a"], ["quantize", "a", "b", "--block-size",
                                                           "48"],
    ["quantize", "a", "b", "--bogus"], ["inspect"], ["inspect", "a", "b"],
], ids=["nothing", "unknown", "no-src", "no-dst", "block-size", "bogus-flag", "no-path",
        "extra"])
def test_usage_errors_exit_2_with_one_line(capsys, argv):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("jax-nf4") and "error:" in err


@pytest.mark.parametrize("argv", [["--help"], ["quantize", "--help"], ["inspect", "--help"],
                                  ["bench", "--help"], ["bench", "--model", "tiny", "-h"]])
def test_help_exits_0(capsys, argv):
    rc, out, _ = run(capsys, *argv)
    assert rc == 0 and "usage:" in out
    if argv[0] in ("bench", "--help"):
        assert "--model" in out


def test_bench_model(capsys):
    """`jax-nf4 bench --model tiny`: the NF4-vs-bf16 decode table, progress on stderr."""
    pytest.importorskip("flax")
    rc, out, err = run(capsys, "bench", "--model", "tiny", "--batch", "2", "--new-tokens", "2",
                       "--prompt-len", "2", "--iters", "1")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "tiny: 2 layers, d_model 128, batch 2, prompt 2, 2 new tokens"
    assert lines[1].split() == ["weights", "tokens/s", "ms/token", "compile", "s", "weights",
                                "projections", "peak", "mem"]
    rows = {}
    for line in lines[2:4]:
        name, tps, ms, _compile, *rest = line.split()
        rows[name] = (float(tps), float(ms))
        if jax.default_backend() == "cpu":
            assert rest[-1] == "-"  # no peak memory statistics on the CPU
        else:
            assert rest[-1] in ("KiB", "MiB", "GiB") and float(rest[-2]) > 0
        assert float(tps) > 0 and float(ms) == pytest.approx(1e3 * 2 / float(tps), rel=0.01)
    assert set(rows) == {"nf4", "bfloat16"}
    # projections: 2 layers x (2*128*128 + 2*64*128 + 3*256*128) weights, 2 B vs 0.5625 B
    assert "KiB" in lines[2] and "162.0 KiB" in lines[2] and "576.0 KiB" in lines[3]
    ratio = rows["nf4"][0] / rows["bfloat16"][0]
    assert lines[4].startswith(f"nf4 / bfloat16: {ratio:.2f}x tokens/s, 0.41x weight memory")
    for weights in ("nf4", "bfloat16"):
        assert f"tiny [....................] {weights} build" in err
        assert f"tiny [####################] {weights} done" in err
    assert run(capsys, "bench", "--model", "nope")[0] == 2
    rc, _, err = run(capsys, "bench", "--model", "tiny", "--batch", "0")
    assert rc == 1 and err == "jax-nf4 bench: error: --batch must be >= 1\n"


def test_runtime_errors_exit_1_with_one_line(tmp_path, model, capsys):
    src, _ = model
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    cases = [
        (["inspect", tmp_path / "missing"], "no such file or directory"),
        (["inspect", bad], "corrupted safetensors header"),
        (["quantize", tmp_path / "missing", tmp_path / "o1"], "no such file or directory"),
        (["quantize", FIXTURE_MODEL, tmp_path / "o2"], "already quantized"),
        (["quantize", src, tmp_path / "o3", "--skip", "("], "not a regular expression"),
        (["quantize", src, src / "inside"], "must not be the source or inside it"),
    ]
    for argv, match in cases:
        rc, _, err = run(capsys, *argv)
        assert rc == 1 and err.count("\n") == 1 and match in err, (argv, err)
    assert not (tmp_path / "o1").exists() and leftovers(tmp_path) == []


def test_console_entry_point_exit_codes(tmp_path):
    def call(*argv):
        return subprocess.run([sys.executable, "-m", "jax_nf4.cli", *argv], cwd=tmp_path,
                              capture_output=True, text=True)
    assert call("inspect", "--help").returncode == 0
    bad = call("quantize")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert call("inspect", str(tmp_path / "nope")).returncode == 1
