"""The CPU handlers spread rows over XLA's intra-op thread pool: results must not depend on how
many threads there are (each output is computed by one thread in a fixed order)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

SCRIPT = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
import jax_nf4
jax.config.update("jax_platforms", "cpu")
rng = np.random.default_rng(0)
w = jnp.asarray(rng.standard_normal((256, 1024)), jnp.bfloat16)
x = jnp.asarray(rng.standard_normal((5, 1024)), jnp.bfloat16)
q = jax.jit(jax_nf4.quantize, static_argnums=1)(w, 64)
qd = jax_nf4.quantize(w, 64, double_quant=True)
outs = [q.packed, q.absmax, jax.jit(jax_nf4.dequantize)(q), jax.jit(jax_nf4.matmul)(x, q),
        jax.jit(jax_nf4.matmul)(x, qd)]
sys.stdout.buffer.write(b"".join(np.asarray(o).tobytes() for o in outs))
"""


def _run(pin_one_core: bool, cwd) -> bytes:
    """The script's output bytes; XLA sizes its intra-op pool by the CPUs the process may use,
    so `taskset -c 0` gives it one thread. (Run outside the checkout, so that the installed
    package with its compiled modules is imported.)"""
    cmd = [sys.executable, "-c", SCRIPT]
    if pin_one_core:
        cmd = ["taskset", "-c", "0"] + cmd
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(cmd, capture_output=True, env=env, timeout=300, cwd=cwd)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return done.stdout


@pytest.mark.skipif(shutil.which("taskset") is None or (os.cpu_count() or 1) < 2,
                    reason="needs taskset and two cores")
def test_results_do_not_depend_on_the_thread_count(tmp_path):
    one, many = _run(True, tmp_path), _run(False, tmp_path)
    assert len(one) > 0 and one == many
