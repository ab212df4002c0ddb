"""The benchmark behind `jax-nf4 bench` (the README's main job), on a tiny CPU problem."""

from __future__ import annotations

import json

from jax_nf4 import benchmark, cli


def test_benchmark_rows_and_table():
    rows = benchmark.run_benchmark(shapes=((64, 128),), rows=(1, 3), min_bytes=1e4, iters=1,
                                   reps=1)
    ops = {(r.m, r.op) for r in rows}
    for m in (1, 3):
        assert {(m, "nf4 matmul"), (m, "nf4 dq matmul"), (m, "jnp nf4"), (m, "dense bf16")} <= ops
    assert {(0, "nf4 dequantize"), (0, "nf4 quantize")} <= ops
    assert all(r.us > 0 and r.gbps > 0 for r in rows)
    nf4_bytes = 64 * 128 // 2 + 64 * 2 * 4
    assert next(r for r in rows if r.op == "nf4 matmul").weight_bytes == nf4_bytes
    table = benchmark.format_table(rows)
    assert "| 64x128 | 1 |" in table and "| 64x128 | 3 |" in table and "quantize us" in table


def test_bench_command_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--shapes", "64x128", "--rows", "2", "--min-mb", "0.01",
                     "--iters", "1", "--json", str(out)]) == 0
    assert "| 64x128 | 2 |" in capsys.readouterr().out
    assert {r["op"] for r in json.loads(out.read_text())} >= {"nf4 matmul", "dense bf16"}
