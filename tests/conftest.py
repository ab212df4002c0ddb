"""Shared fixtures: the backend each test runs on, and a per-test random generator."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest

# `python -m pytest` puts the checkout first on sys.path. Its jax_nf4/ holds no compiled extension
# unless it was built in place, so then test the installed package instead.
_CHECKOUT = Path(__file__).resolve().parent.parent
if not any((_CHECKOUT / "jax_nf4").glob("_nf4_cpu*")):
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _CHECKOUT]

PLATFORMS = ["cpu", "gpu"]


def _gpu_missing() -> str | None:
    """Why the GPU variant of a test cannot run here, or None when it can."""
    import jax_nf4  # after the sys.path fix above

    if not jax_nf4.cuda_available():
        return "jax_nf4 was built without its CUDA kernels"
    try:
        jax.devices("gpu")
    except RuntimeError:
        return "JAX has no GPU backend"
    return None


def pytest_make_parametrize_id(config, val, argname):
    """Shapes read as 2x3x64 in test ids (() as "scalar")."""
    if isinstance(val, tuple) and all(isinstance(d, int) for d in val):
        return "x".join(map(str, val)) or "scalar"
    return None


@pytest.fixture(params=PLATFORMS)
def platform(request) -> str:
    """Backend name; "gpu" skips where unavailable, or fails when JAX_NF4_REQUIRE_GPU=1."""
    if request.param == "gpu" and (reason := _gpu_missing()):
        if os.environ.get("JAX_NF4_REQUIRE_GPU") == "1":
            pytest.fail(f"JAX_NF4_REQUIRE_GPU=1 but {reason}")
        pytest.skip(reason)
    return request.param


@pytest.fixture
def device(platform: str) -> jax.Device:
    """The first device of the test's platform; tests commit their inputs to it."""
    return jax.devices(platform)[0]


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test id, so every parametrization draws its own data."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def bench_script():
    """``load(name)``: the module of ``bench/<name>.py`` (benchmark scripts, not in the
    package)."""
    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="module")
def run_on_8_cpu_devices(tmp_path_factory):
    """``run(script, *args)``: runs ``python -c script args`` on 8 virtual CPU devices and
    returns ``{name: result}`` of the JSON lines ``RESULT {"name": ...}`` it prints; the script
    must print ``DONE`` last. (JAX reads ``--xla_force_host_platform_device_count`` only when
    its backends start, which other test modules do first, hence a subprocess; it runs in an
    empty folder so that no checkout shadows the installed package.)"""
    import jax_nf4

    def run(script: str, *args: str, timeout: int = 600) -> dict:
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                              " --xla_force_host_platform_device_count=8").strip(),
                   PYTHONPATH=str(Path(jax_nf4.__file__).resolve().parent.parent))
        proc = subprocess.run([sys.executable, "-c", script, *args], env=env,
                              capture_output=True, text=True, timeout=timeout, check=False,
                              cwd=tmp_path_factory.mktemp("cwd"))
        assert proc.returncode == 0 and "DONE" in proc.stdout, (
            f"subprocess failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-8000:]}")
        return {r["name"]: r for r in (json.loads(line[len("RESULT "):])
                                       for line in proc.stdout.splitlines()
                                       if line.startswith("RESULT "))}

    return run
