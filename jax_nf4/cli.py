"""The ``jax-nf4`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jax-nf4`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="jax-nf4", description="NF4 weights for JAX.")
    parser.add_argument("command", choices=["bench"], help="bench: time the NF4 ops against "
                        "dense bf16 and plain-jnp NF4 (run `jax-nf4 bench --help`)")
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "bench":
        from jax_nf4 import benchmark
        return benchmark.main(rest + argv[1:])
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
