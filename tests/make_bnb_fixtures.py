"""Writes tests/fixtures/ with real bitsandbytes (CPU backend): a small 4-bit model folder in the
Hugging Face layout, plus the values bitsandbytes itself returned for each layer.

Run from the repository root (needs torch, bitsandbytes and safetensors; the tests do not):

    pip install torch==2.13.0 bitsandbytes==0.50.2 safetensors==0.8.0
    python tests/make_bnb_fixtures.py

The committed fixtures were made with bitsandbytes 0.50.2, torch 2.13.0+cpu and safetensors
0.8.0 on x86-64 (AVX-512) Linux; the script records the versions it ran with in
``bnb_expected.safetensors``'s metadata and in ``bnb_model/config.json`` (``_fixture_versions``).

What is written:

* ``fixtures/bnb_model/``: ``config.json`` with the ``quantization_config`` transformers writes,
  two safetensors shards written by ``safetensors.torch.save_file`` from the state dicts of
  ``bitsandbytes.nn.Linear4bit`` modules (NF4; double quantization on and off; blocksizes 32, 64,
  128 and 256; quant_storage uint8, bfloat16, float16 and float32; model dtypes bf16, f16, f32),
  ``model.safetensors.index.json``, and a few dense tensors (embedding, norm, lm_head, a bias).
* ``fixtures/bnb_expected.safetensors``: for every 4-bit layer ``<m>.weight``:
  ``<m>.weight.original`` (the dense input, model dtype), ``<m>.weight.dequantized``
  (``bitsandbytes.functional.dequantize_4bit``, model dtype) and ``<m>.weight.absmax_f32`` (the
  float32 absmax of ``quantize_4bit(compress_statistics=False)`` on the same input).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as F
import safetensors
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent / "fixtures"
MODEL = HERE / "bnb_model"

# name, (out, in), blocksize, nested, quant_storage, dtype, bias
LAYERS = [
    ("model.layers.0.self_attn.q_proj", (32, 128), 64, False, torch.uint8, torch.bfloat16, True),
    ("model.layers.0.self_attn.k_proj", (32, 128), 64, True, torch.uint8, torch.bfloat16, False),
    ("model.layers.0.mlp.up_proj", (16, 256), 128, False, torch.bfloat16, torch.float16, False),
    ("model.layers.0.mlp.down_proj", (16, 256), 128, True, torch.bfloat16, torch.float32, False),
    # 384 blocks: two nested blocks, the second one partial.
    ("model.layers.1.self_attn.q_proj", (48, 256), 32, True, torch.uint8, torch.bfloat16, False),
    ("model.layers.1.mlp.up_proj", (8, 512), 256, True, torch.float32, torch.float16, False),
    ("model.layers.1.mlp.down_proj", (16, 64), 32, False, torch.float16, torch.bfloat16, False),
]
SHARD_OF_LAYER = {"model.layers.0": 1, "model.layers.1": 2}


def make_weight(i: int, shape, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234 + i)
    w = torch.randn(shape, generator=g, dtype=torch.float32) * (0.02 * (i + 1))
    if i == 0:
        w[0, :64] = 0.0  # an all-zero block: code 7, absmax 0
        w[1, 5] = 0.75  # an outlier
        w[2, 64:128] = w[2, 64:128].abs()  # one-signed block
    return w.to(dtype)


def linear4bit(w: torch.Tensor, bias: torch.Tensor | None, bs: int, nested: bool, storage,
               dtype) -> bnb.nn.Linear4bit:
    out_f, in_f = w.shape
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=dtype,
                            compress_statistics=nested, quant_type="nf4", quant_storage=storage)
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, blocksize=bs,
                                   compress_statistics=nested, quant_type="nf4",
                                   quant_storage=storage, module=lin)
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    lin = lin.to("cpu")  # quantizes on the CPU backend
    assert lin.weight.bnb_quantized and lin.weight.quant_state.blocksize == bs
    return lin


def main() -> None:
    if MODEL.exists():
        shutil.rmtree(MODEL)
    MODEL.mkdir(parents=True)
    versions = {"bitsandbytes": bnb.__version__, "torch": torch.__version__,
                "safetensors": safetensors.__version__}
    shards: dict[int, dict[str, torch.Tensor]] = {1: {}, 2: {}}
    expected: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(7)
    shards[1]["model.embed_tokens.weight"] = torch.randn(16, 32, generator=g).to(torch.bfloat16)
    shards[2]["model.norm.weight"] = torch.ones(32, dtype=torch.bfloat16)
    shards[2]["lm_head.weight"] = torch.randn(16, 32, generator=g).to(torch.bfloat16)
    for i, (name, shape, bs, nested, storage, dtype, has_bias) in enumerate(LAYERS):
        w = make_weight(i, shape, dtype)
        bias = torch.randn(shape[0], generator=g).to(dtype) if has_bias else None
        lin = linear4bit(w, bias, bs, nested, storage, dtype)
        sd = {f"{name}.{k}": v.detach().contiguous() for k, v in lin.state_dict().items()}
        # Cross-check against the functional API on the same input.
        packed, state = F.quantize_4bit(w, blocksize=bs, compress_statistics=nested,
                                        quant_type="nf4", quant_storage=storage)
        assert torch.equal(packed.view(torch.uint8), sd[f"{name}.weight"].view(torch.uint8))
        deq = F.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
        assert deq.dtype == dtype and tuple(deq.shape) == shape
        _, plain = F.quantize_4bit(w, blocksize=bs, compress_statistics=False, quant_type="nf4")
        shard = SHARD_OF_LAYER[".".join(name.split(".")[:3])]
        shards[shard].update(sd)
        expected[f"{name}.weight.original"] = w.contiguous()
        expected[f"{name}.weight.dequantized"] = deq.contiguous()
        expected[f"{name}.weight.absmax_f32"] = plain.absmax.contiguous()
    names = {k: f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in shards}
    weight_map = {}
    total = 0
    for k, tensors in shards.items():
        save_file(tensors, MODEL / names[k], metadata={"format": "pt"})
        weight_map.update({t: names[k] for t in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (MODEL / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        indent=2) + "\n")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
        "hidden_size": 32, "vocab_size": 16, "num_hidden_layers": 2,
        "quantization_config": {
            "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": "bfloat16",
            "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True, "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None,
            "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False,
            "quant_method": "bitsandbytes"},
        "_fixture_versions": versions,
    }
    (MODEL / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(expected, HERE / "bnb_expected.safetensors",
              metadata={"format": "pt", **{f"version.{k}": v for k, v in versions.items()}})
    size = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"wrote {HERE} ({size} bytes) with {versions}")


if __name__ == "__main__":
    main()
