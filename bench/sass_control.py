"""Print a kernel's SASS with the scheduling control bits decoded (Volta and later).

nvdisasm prints the control bits only inside the raw encoding (`-hex`); this decodes, per
instruction, the write / read scoreboard it sets and the scoreboards it waits on, which tell
which loads a wait covers (bench/NOTES.md, session 26):

    pip install nvidia-cuda-nvdisasm
    nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a \\
        -DJAX_NF4_SM90A -I$(python3 -c "import jax; print(jax.ffi.include_dir())") -Icpp \\
        -cubin -o /tmp/gemv.cubin cpp/gemv_cuda.cu
    nvdisasm -hex -c /tmp/gemv.cubin > /tmp/gemv.sass
    python3 bench/sass_control.py /tmp/gemv.sass BytePairKernelI13__nv_bfloat16Li1 \\
        --only "LDG|BAR|wait"

Output lines: offset, instruction, then W<n> (sets write scoreboard n), R<n> (read scoreboard
n) and wait[...] (waits until those scoreboards' counters are zero).
"""

import argparse
import re
import sys


def functions(lines: list[str]) -> dict[str, list[str]]:
    """The disassembly's lines grouped by function (`.text.NAME:` headers)."""
    out: dict[str, list[str]] = {}
    current = None
    for line in lines:
        header = re.match(r"^\.text\.(\S+):", line)
        if header:
            current = header.group(1)
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return out


def decode(body: list[str]):
    """(offset, instruction, write sb, read sb, wait mask) per instruction of `nvdisasm -hex`."""
    for i, line in enumerate(body[:-1]):
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*/\* (0x[0-9a-f]{16}) \*/", line)
        hi = re.search(r"/\* (0x[0-9a-f]{16}) \*/", body[i + 1])
        if not m or not hi:
            continue
        ctrl = int(hi.group(1), 16) >> 41  # bits 105 - 125 of the 128-bit instruction
        yield (int(m.group(1), 16), m.group(2).strip(), (ctrl >> 5) & 7, (ctrl >> 8) & 7,
               (ctrl >> 11) & 0x3F)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sass", help="output of `nvdisasm -hex -c KERNEL.cubin`")
    parser.add_argument("function", help="a substring of the mangled kernel name (first match)")
    parser.add_argument("--only", default="", help="regex: print only lines that match it")
    args = parser.parse_args()
    with open(args.sass) as f:
        funcs = functions(f.read().split("\n"))
    names = [n for n in funcs if args.function in n]
    if not names:
        print(f"no function matching {args.function!r} in {args.sass}", file=sys.stderr)
        return 1
    print(names[0])
    for offset, ins, write, read, wait in decode(funcs[names[0]]):
        flags = (f" W{write}" if write != 7 else "") + (f" R{read}" if read != 7 else "")
        if wait:
            flags += " wait[" + ",".join(str(b) for b in range(6) if wait >> b & 1) + "]"
        line = f"{offset:6x}  {ins[:72]:72s}{flags}"
        if not args.only or re.search(args.only, line):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
