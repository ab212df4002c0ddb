"""bitsandbytes / Hugging Face interop: fixtures written by real bitsandbytes load bit-exact,
layouts convert losslessly both ways, model folders load lazily, and every malformed
checkpoint raises a CheckpointError that names the file and the key.

The fixtures (tests/fixtures/, made by tests/make_bnb_fixtures.py with bitsandbytes 0.50.2 and
torch 2.13.0+cpu) are read here without torch or bitsandbytes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

import jax_nf4
from jax_nf4 import NF4Weight, bnb, reference
from jax_nf4 import double_quant as dq
from jax_nf4.checkpoint import Checkpoint, iter_checkpoint, load_checkpoint, unflatten
from jax_nf4.safetensors_io import CheckpointError, SafetensorsFile, load_file, save_file

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MODEL = FIXTURES / "bnb_model"
EXPECTED = load_file(FIXTURES / "bnb_expected.safetensors")
LAYERS = sorted(k[: -len(".original")] for k in EXPECTED if k.endswith(".original"))
QS = bnb.QUANT_STATE_SUFFIX


def model_tensors() -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(MODEL.glob("*.safetensors")):
        out.update(load_file(f))
    return out


TENSORS = model_tensors()


def u8(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a)).reshape(-1).view(np.uint8)


def layer_tensors(layer: str) -> dict[str, np.ndarray]:
    return {k: v for k, v in TENSORS.items() if k == layer or k.startswith(layer + ".")}


def quant_state(layer: str) -> dict:
    return json.loads(u8(TENSORS[f"{layer}.{QS}"]).tobytes())


# ----------------------------------------------------------------------------- fixtures

def test_fixtures_were_made_by_bitsandbytes():
    meta = SafetensorsFile(FIXTURES / "bnb_expected.safetensors").metadata
    assert meta["version.bitsandbytes"] == "0.50.2" and meta["version.torch"].startswith("2.13")
    kinds = {(quant_state(m)["blocksize"], "nested_offset" in quant_state(m),
              TENSORS[m].dtype.name) for m in LAYERS}
    assert {bs for bs, _, _ in kinds} == {32, 64, 128, 256}
    assert {n for _, n, _ in kinds} == {True, False}
    assert {s for _, _, s in kinds} == {"uint8", "bfloat16", "float16", "float32"}


@pytest.mark.parametrize("layer", LAYERS)
def test_fixture_dequantizes_bit_exact(layer):
    q = bnb.weight_from_bnb(TENSORS, layer)
    expected = EXPECTED[f"{layer}.dequantized"]
    assert q.shape == expected.shape and q.dtype == expected.dtype
    assert q.double_quant == ("nested_offset" in quant_state(layer))
    got = np.asarray(jax_nf4.dequantize(bnb.to_jax(q)))
    np.testing.assert_array_equal(u8(got), u8(expected))
    # and through the fused matmul: rows of the identity select columns of the weight
    eye = np.eye(q.shape[1], dtype=np.float32)[:4]
    np.testing.assert_array_equal(np.asarray(jax_nf4.matmul(eye, q)),
                                  np.asarray(jax_nf4.dequantize(q, np.float32)).T[:4])


@pytest.mark.parametrize("layer", LAYERS)
def test_quantize_reproduces_bitsandbytes(layer):
    q = bnb.weight_from_bnb(TENSORS, layer)
    original = EXPECTED[f"{layer}.original"]
    absmax_f32 = EXPECTED[f"{layer}.absmax_f32"].reshape(q.shape[0], -1)
    mine = jax_nf4.quantize(original, q.block_size, double_quant=q.double_quant)
    np.testing.assert_array_equal(np.asarray(mine.packed), q.packed)  # same NF4 codes
    if not q.double_quant:
        np.testing.assert_array_equal(u8(mine.absmax), u8(q.absmax))
        return
    np.testing.assert_array_equal(u8(jax_nf4.quantize(original, q.block_size).absmax),
                                  u8(absmax_f32))
    # given bitsandbytes' offset, the 8-bit quantizer reproduces its codes and nested absmax
    codes, nested, _ = dq.reference_quantize_scales(absmax_f32, q.absmax.offset)
    np.testing.assert_array_equal(codes, q.absmax.codes)
    np.testing.assert_array_equal(u8(nested), u8(q.absmax.nested_absmax))
    np.testing.assert_array_equal(u8(q.absmax.table), u8(dq.DYNAMIC_MAP))
    # our offset (a fixed-order mean) is within a few ulps of torch.mean's
    ours, theirs = np.float32(np.asarray(mine.absmax.offset)), np.float32(q.absmax.offset)
    assert abs(ours - theirs) <= 4 * np.spacing(theirs)


@pytest.mark.parametrize("layer", LAYERS)
def test_round_trip_b_to_a_to_b_is_bit_exact(layer):
    src = layer_tensors(layer)
    q = bnb.weight_from_bnb(TENSORS, layer)
    out = bnb.weight_to_bnb(q, layer, quant_storage=TENSORS[layer].dtype)
    assert set(out) == set(src) and list(out) == bnb.layer_keys(layer, q.double_quant)
    for key, arr in out.items():
        assert arr.dtype == src[key].dtype and arr.shape == src[key].shape, key
        np.testing.assert_array_equal(u8(arr), u8(src[key]), err_msg=key)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("storage", [np.uint8, ml_dtypes.bfloat16, np.float16, np.float32])
def test_round_trip_a_to_b_to_a_through_a_file(tmp_path, rng, double_quant, storage):
    w = rng.standard_normal((24, 256)).astype(np.float32)
    q = jax.tree.map(np.asarray, jax_nf4.quantize(w, 32, double_quant=double_quant))
    save_file(bnb.weight_to_bnb(q, "layer.weight", quant_storage=storage), tmp_path / "a.st")
    f = SafetensorsFile(tmp_path / "a.st")
    assert f.info("layer.weight").dtype == np.dtype(storage)
    back = bnb.weight_from_bnb(f, "layer.weight")
    assert jax.tree.structure(back) == jax.tree.structure(q)
    assert (back.shape, back.block_size, back.dtype) == (q.shape, q.block_size, q.dtype)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(q)):
        np.testing.assert_array_equal(u8(a), u8(b))


def test_layout_conversion_follows_the_definitions(rng):
    n, k = 6, 8
    codes = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
    flat = codes.reshape(-1)
    layout_b = (flat[0::2] << 4) | flat[1::2]  # flat index 2i in the HIGH nibble
    layout_a = reference.pack_pairs(codes)  # row 2j low, 2j+1 high
    np.testing.assert_array_equal(bnb.layout_b_from_a(layout_a), layout_b)
    np.testing.assert_array_equal(bnb.layout_a_from_b(layout_b, n, k), layout_a)
    np.testing.assert_array_equal(
        bnb.layout_a_from_b(layout_b.view(np.uint16), n, k), layout_a)  # any storage dtype


# ----------------------------------------------------------------------------- model folders

def test_load_checkpoint_builds_the_module_tree():
    tree = load_checkpoint(MODEL)
    q_proj = tree["model"]["layers"]["0"]["self_attn"]["q_proj"]
    assert isinstance(q_proj["weight"], NF4Weight) and isinstance(q_proj["bias"], jax.Array)
    assert isinstance(q_proj["weight"].packed, jax.Array)
    assert tree["model"]["norm"]["weight"].dtype == ml_dtypes.bfloat16
    flat = load_checkpoint(MODEL, nested=False, to_jax=False)
    assert set(flat) == set(LAYERS) | {"model.embed_tokens.weight", "model.norm.weight",
                                       "lm_head.weight", "model.layers.0.self_attn.q_proj.bias"}
    for layer in LAYERS:
        got = np.asarray(jax_nf4.dequantize(flat[layer]))
        np.testing.assert_array_equal(u8(got), u8(EXPECTED[f"{layer}.dequantized"]))
    assert isinstance(flat["lm_head.weight"], np.memmap)  # dense tensors stay lazy
    np.testing.assert_array_equal(u8(flat["lm_head.weight"]), u8(TENSORS["lm_head.weight"]))


def test_checkpoint_reads_headers_only_and_iterates_lazily(monkeypatch):
    ck = Checkpoint(MODEL)
    assert len(ck.files) == 2 and ck.quantization_config["bnb_4bit_quant_type"] == "nf4"
    assert ck.source_of(LAYERS[0]).name.startswith("model-0000")
    seen = []
    for name, value in iter_checkpoint(ck):
        seen.append(name)
        assert isinstance(value, (NF4Weight, np.ndarray))
    assert len(seen) == len(set(seen)) == len(LAYERS) + 4


def test_a_single_file_loads_too(tmp_path):
    save_file(layer_tensors(LAYERS[0]), tmp_path / "one.safetensors")
    tree = load_checkpoint(tmp_path / "one.safetensors", to_jax=False)
    assert isinstance(tree["model"]["layers"]["0"]["mlp"]["down_proj"]["weight"], NF4Weight)


def test_unflatten_rejects_a_tensor_that_is_also_a_module():
    with pytest.raises(CheckpointError, match="both a tensor and a module"):
        unflatten({"a.b": 1, "a.b.c": 2})


def test_loading_never_imports_torch(tmp_path):
    code = ("import sys, jax_nf4.checkpoint, jax_nf4.convert, jax_nf4.cli; "
            f"jax_nf4.checkpoint.load_checkpoint({str(MODEL)!r}); "
            "assert 'torch' not in sys.modules and 'bitsandbytes' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)


# ----------------------------------------------------------------------------- safetensors I/O

def test_writer_and_reader_round_trip_every_dtype(tmp_path):
    tensors = {
        "bf16": np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(2, 3),
        "f16": np.ones((3,), np.float16), "f32": np.float32(2.5).reshape(()),
        "f64": np.zeros((1, 1), np.float64), "i64": np.arange(3, dtype=np.int64),
        "u8": np.arange(5, dtype=np.uint8), "bool": np.array([True, False]),
        "f8": np.ones(4, ml_dtypes.float8_e4m3fn), "empty": np.zeros((0, 4), np.float32),
    }
    save_file(tensors, tmp_path / "x.safetensors", {"format": "pt"})
    raw = (tmp_path / "x.safetensors").read_bytes()
    assert (8 + int.from_bytes(raw[:8], "little")) % 8 == 0
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert f.metadata == {"format": "pt"} and list(f) == list(tensors)
    for name, arr in tensors.items():
        got = f[name]
        assert got.dtype == arr.dtype and got.shape == arr.shape
        np.testing.assert_array_equal(u8(got), u8(arr))
    assert not f["u8"].flags.writeable


def test_reader_reads_files_written_by_the_safetensors_package():
    f = SafetensorsFile(MODEL / "model-00001-of-00002.safetensors")
    assert f.metadata == {"format": "pt"}
    assert f.info("model.embed_tokens.weight").dtype_name == "BF16"


# ----------------------------------------------------------------------------- errors

def write_layer(tmp_path: Path, layer: str, *, drop=(), replace=None, state=None,
                config=None) -> Path:
    """A one-file model folder holding ``layer`` from the fixture, modified."""
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    tensors = {k: v for k, v in layer_tensors(layer).items()
               if k[len(layer) + 1:] not in drop and not (k == layer and "" in drop)}
    if state is not None:
        qs = quant_state(layer)
        qs.update(state)
        tensors[f"{layer}.{QS}"] = np.frombuffer(json.dumps(qs).encode(), np.uint8)
    for k, v in (replace or {}).items():
        tensors.pop(f"{layer}.{QS}" if k == QS else f"{layer}.{k}" if k else layer, None)
        if v is not None:
            tensors[k if "." in k and k.startswith(layer) else f"{layer}.{k}" if k else layer] = v
    save_file(tensors, folder / "model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


PLAIN = "model.layers.0.self_attn.q_proj.weight"
NESTED = "model.layers.0.self_attn.k_proj.weight"


def expect_error(path, *match: str) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, to_jax=False)
    for m in match:
        assert m in str(info.value), str(info.value)
    return info.value


def test_error_fp4_quant_state(tmp_path):
    blob = json.loads(u8(TENSORS[f"{PLAIN}.{QS}"]).tobytes())
    blob["quant_type"] = "fp4"
    fp4 = np.frombuffer(json.dumps(blob).encode(), np.uint8)
    folder = write_layer(tmp_path, PLAIN, replace={QS: None,
                                                   f"{PLAIN}.quant_state.bitsandbytes__fp4": fp4})
    e = expect_error(folder, "FP4", "model.safetensors", "bitsandbytes__fp4")
    assert e.key.endswith("bitsandbytes__fp4")


def test_error_fp4_quant_type_in_an_nf4_key(tmp_path):
    expect_error(write_layer(tmp_path, PLAIN, state={"quant_type": "fp4"}),
                 "quant_type 'fp4' is not supported", QS)


@pytest.mark.parametrize("qc, match", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
     "bnb_4bit_quant_type 'fp4'"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "8-bit"),
    ({"quant_method": "gptq"}, "quant_method 'gptq'"),
])
def test_error_unsupported_quantization_config(tmp_path, qc, match):
    expect_error(write_layer(tmp_path, PLAIN, config={"quantization_config": qc}), match,
                 "config.json")


@pytest.mark.parametrize("layer, drop, key", [
    (PLAIN, ("absmax",), "weight.absmax"),
    (PLAIN, ("quant_map",), "weight.quant_map"),
    (PLAIN, ("",), f"{PLAIN}'"),
    (NESTED, ("nested_absmax",), "weight.nested_absmax"),
    (NESTED, ("nested_quant_map",), "weight.nested_quant_map"),
    (PLAIN, (QS,), QS),
], ids=["absmax", "quant_map", "weight", "nested_absmax", "nested_quant_map", "quant_state"])
def test_error_missing_keys(tmp_path, layer, drop, key):
    expect_error(write_layer(tmp_path, layer, drop=drop), "missing key", key,
                 "model.safetensors")


@pytest.mark.parametrize("layer, replace, match", [
    (PLAIN, {"absmax": np.zeros(7, np.float32)}, "expected float32 with 64 elements"),
    (PLAIN, {"absmax": np.zeros(64, np.float16)}, "expected float32 with 64 elements"),
    (PLAIN, {"": np.zeros((100, 1), np.uint8)}, "packs into 2048 bytes"),
    (NESTED, {"absmax": np.zeros(64, np.float32)}, "expected uint8 with 64 elements"),
    (NESTED, {"nested_absmax": np.zeros(2, np.float32)}, "expected float32 with 1 elements"),
    (NESTED, {"nested_quant_map": np.zeros(16, np.float32)}, "expected float32 with 256"),
    (PLAIN, {"quant_map": np.linspace(-1, 1, 16).astype(np.float32)}, "not the NF4 codebook"),
    (NESTED, {"nested_absmax": -np.ones(1, np.float32)}, "negative or NaN"),
], ids=["absmax-size", "absmax-dtype", "weight-size", "codes-dtype", "nested-size",
        "nested-map", "quant-map", "nested-negative"])
def test_error_shape_mismatches_and_bad_values(tmp_path, layer, replace, match):
    expect_error(write_layer(tmp_path, layer, replace=replace), match, "model.safetensors")


@pytest.mark.parametrize("state, match, key", [
    ({"shape": [32, 64]}, "packs into 1024 bytes", PLAIN),
    ({"shape": [31, 128]}, "does not fit layout A", QS),
    ({"shape": [4096]}, "holds 2-D weights", QS),
    ({"blocksize": 48}, "blocksize 48", QS),
    ({"dtype": "int8"}, "dtype 'int8'", QS),
    ({"nested_offset": "x", "nested_blocksize": 256, "nested_dtype": "float32"},
     "bad nested_offset", QS),
], ids=["shape", "odd-N", "1-D", "blocksize", "dtype", "offset"])
def test_error_quant_state_contents(tmp_path, state, match, key):
    e = expect_error(write_layer(tmp_path, PLAIN, state=state), match, key)
    assert e.key.endswith(key)


def test_error_corrupted_quant_state_json(tmp_path):
    folder = write_layer(tmp_path, PLAIN, replace={QS: np.frombuffer(b'{"quant_type": "nf4",',
                                                                     np.uint8)})
    expect_error(folder, "corrupted quant state", "JSON", QS)


def corrupt(path: Path, fn) -> Path:
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(fn(data)))
    return path


def header_len(data) -> int:
    return int.from_bytes(bytes(data[:8]), "little")


def test_error_corrupted_header_json(tmp_path):
    folder = write_layer(tmp_path, PLAIN)
    corrupt(folder / "model.safetensors", lambda d: d[:8] + b"#" + d[9:])
    expect_error(folder, "corrupted safetensors header", "JSON", "model.safetensors")


@pytest.mark.parametrize("cut", ["data", "header", "length"])
def test_error_truncated_file(tmp_path, cut):
    folder = write_layer(tmp_path, PLAIN)
    f = folder / "model.safetensors"
    keep = {"data": lambda d: d[:-10], "header": lambda d: d[: 8 + header_len(d) // 2],
            "length": lambda d: d[:5]}[cut]
    corrupt(f, keep)
    expect_error(folder, "truncated", "model.safetensors")


def rewrite_header(path: Path, fn) -> None:
    data = path.read_bytes()
    n = header_len(data)
    header = fn(json.loads(data[8: 8 + n]))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw)) if len(raw) <= n else b""
    assert len(raw) == n
    path.write_bytes(data[:8] + raw + data[8 + n:])


@pytest.mark.parametrize("edit, match", [
    (lambda h: {**h, PLAIN: {**h[PLAIN], "dtype": "Q4"}}, "unknown dtype 'Q4'"),
    (lambda h: {**h, PLAIN: {**h[PLAIN], "shape": [2048, 2]}}, "shape mismatch"),
    (lambda h: {**h, PLAIN: {**h[PLAIN], "data_offsets": [0, 2048]}}, "overlap"),
    (lambda h: {**h, PLAIN: {"dtype": "U8"}}, "needs dtype, shape and data_offsets"),
], ids=["dtype", "shape", "overlap", "entry"])
def test_error_bad_header_entries(tmp_path, edit, match):
    folder = write_layer(tmp_path, PLAIN)
    rewrite_header(folder / "model.safetensors", edit)
    e = expect_error(folder, match, "model.safetensors")
    assert e.key == PLAIN


def test_errors_in_shard_index_and_config(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(MODEL, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["extra.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_error(folder, "missing key", "extra.weight", "model-00001-of-00002.safetensors")
    index["weight_map"]["extra.weight"] = "model-00003-of-00003.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_error(folder, "missing shard file", "model-00003-of-00003.safetensors")
    (folder / "model.safetensors.index.json").write_text("{not json")
    expect_error(folder, "corrupted shard index", "model.safetensors.index.json")
    (folder / "model.safetensors.index.json").unlink()
    (folder / "config.json").write_text('{"quantization_config": ')
    expect_error(folder, "corrupted config.json", "config.json")
    (folder / "config.json").unlink()
    assert len(load_checkpoint(folder, nested=False, to_jax=False)) == len(LAYERS) + 4
    for f in folder.glob("*.safetensors"):
        f.unlink()
    expect_error(folder, "no *.safetensors files")
    expect_error(tmp_path / "nowhere", "no such file or directory")


def test_error_quant_state_missing_while_aux_tensors_exist(tmp_path):
    e = expect_error(write_layer(tmp_path, NESTED, drop=(QS,)), "missing key", QS)
    assert e.key == f"{NESTED}.{QS}"


def test_weight_to_bnb_rejects_what_bitsandbytes_cannot_store(rng):
    q = jax_nf4.quantize(rng.standard_normal((2, 8, 64)).astype(np.float32), 64)
    with pytest.raises(ValueError, match="one weight"):
        bnb.weight_to_bnb(q, "w")
    odd = NF4Weight(np.zeros((1, 6), np.uint8), np.ones((2, 1), np.float32), (2, 6), 6)
    with pytest.raises(ValueError, match="whole float32 elements"):
        bnb.weight_to_bnb(odd, "w", quant_storage=np.float32)
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        bnb.weight_to_bnb(NF4Weight(odd.packed, odd.absmax, (2, 6), 6, np.float64), "w")
    assert bnb.weight_to_bnb(jax.tree.map(lambda a: a[0], q), "w")["w"].shape == (256, 1)
