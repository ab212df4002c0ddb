"""Side by side: two `bench_matmul.py --json` runs of the same shapes (A = this checkout, B = a
second build, `bash bench/gpu_run.sh ab DIR`), per shape, M and jax_nf4 op: the time per call
of each (kernel µs where both runs traced the op, else wall µs), B / A, and each run's dense
bf16 time as the check that the two runs saw the same card state.

    python3 bench/ab_compare.py A.json B.json
"""

from __future__ import annotations

import argparse
import json

OPS = ("nf4 matmul", "nf4 dq matmul")


def load(path: str) -> dict[tuple, dict]:
    """The matmul rows of a bench_matmul JSON file, keyed by (shape, M, op)."""
    with open(path) as f:
        return {(tuple(r["shape"]), r["m"], r["op"]): r for r in json.load(f) if "m" in r}


def table(a: dict[tuple, dict], b: dict[tuple, dict]) -> list[str]:
    """Markdown lines comparing the jax_nf4 ops present in both runs (kernel µs where both runs
    traced that row, else wall µs)."""
    lines = ["| N x K | M | op | time | A µs | B µs | B / A | dense A / B µs |",
             "|---|---|---|---|---|---|---|---|"]
    for shape, m, op in sorted(k for k in a if k in b and k[2] in OPS):
        ra, rb = a[shape, m, op], b[shape, m, op]
        key = "kernel_us" if ra.get("kernel_us") and rb.get("kernel_us") else "us"
        dense = [run.get((shape, m, "dense bf16"), {}).get(key) for run in (a, b)]
        dense_text = " / ".join(f"{d:.1f}" if d else "-" for d in dense)
        lines.append(f"| {shape[0]}x{shape[1]} | {m} | {op} | {'kernel' if key == 'kernel_us' else 'wall'}"
                     f" | {ra[key]:.1f} | {rb[key]:.1f} | {rb[key] / ra[key]:.3f} | "
                     f"{dense_text} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="bench_matmul.py --json of build A")
    p.add_argument("b", help="bench_matmul.py --json of build B")
    args = p.parse_args()
    print("\n".join(table(load(args.a), load(args.b))))


if __name__ == "__main__":
    main()
