"""Side by side: `bench_matmul.py --json` runs of the same shapes (A = this checkout, then one
or more other builds, `bash bench/gpu_run.sh build,ab DIR[,DIR...]`), per shape, M and jax_nf4
op: the time per call of each (kernel µs where every run traced the op, else wall µs), each
build's time relative to A, and each run's dense bf16 time as the check that the runs saw the
same card state.

    python3 bench/ab_compare.py A.json B.json [C.json ...]
"""

from __future__ import annotations

import argparse
import json
import os

OPS = ("nf4 matmul", "nf4 dq matmul", "nf4 dequantize", "nf4 quantize")  # the last two: M = 0


def load(path: str) -> dict[tuple, dict]:
    """The rows of a bench_matmul JSON file, keyed by (shape, M, op) (M = 0: no activations)."""
    with open(path) as f:
        return {(tuple(r["shape"]), r["m"], r["op"]): r for r in json.load(f) if "m" in r}


def table(runs: dict[str, dict[tuple, dict]]) -> list[str]:
    """Markdown lines comparing the jax_nf4 ops present in every run; `runs` maps a name to a
    loaded run, the first is the reference (kernel µs where every run traced the row, else
    wall µs)."""
    names = list(runs)
    ref, others = names[0], names[1:]
    head = (["N x K", "M", "op", "time", f"{ref} µs"]
            + [c for n in others for c in (f"{n} µs", f"{n} / {ref}")] + ["dense µs (each run)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted(k for k in runs[ref] if k[2] in OPS and all(k in r for r in runs.values()))
    for shape, m, op in keys:
        rows = [runs[n][shape, m, op] for n in names]
        key = "kernel_us" if all(r.get("kernel_us") for r in rows) else "us"
        cells = [f"{shape[0]}x{shape[1]}", str(m) if m else "-", op,
                 "kernel" if key == "kernel_us" else "wall",
                 f"{rows[0][key]:.1f}"]
        for r in rows[1:]:
            cells += [f"{r[key]:.1f}", f"{r[key] / rows[0][key]:.3f}"]
        dense = [runs[n].get((shape, m, "dense bf16"), {}).get(key) for n in names]
        cells.append(" / ".join(f"{d:.1f}" if d else "-" for d in dense))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="bench_matmul.py --json files, the reference first")
    args = p.parse_args()
    if len(args.runs) < 2:
        p.error(f"need the reference and at least one other run, got {len(args.runs)} file")
    names = [os.path.splitext(os.path.basename(path))[0].removeprefix("ab_") for path in args.runs]
    if len(set(names)) != len(names):
        p.error(f"runs need distinct file names, got {names}")
    print("\n".join(table({n: load(path) for n, path in zip(names, args.runs)})))


if __name__ == "__main__":
    main()
