"""8B decode, batch 1: every kernel's time per token (not only the top 16), for the NF4 +
NF4 lm_head model and the bf16 model, with the attention core as einsums (current) and as
multiply-reduce (variant V1, S = 1 only)."""
import dataclasses, math, sys, time
import jax, jax.numpy as jnp
from flax import nnx
from jax_nf4.models import llama
from jax_nf4.benchmark import trace_call, top_kernels, device_us_by_kind

orig_call = llama.Attention.__call__

def v1_call(self, x, positions, kv):
    c = self.config
    b, s, _ = x.shape
    if kv is None or s != 1:
        return orig_call(self, x, positions, kv)
    groups = c.n_heads // c.n_kv_heads
    qkv = self.qkv_proj(x).reshape(b, s, c.n_kv_heads, groups + 2, c.head_dim)
    q = llama.rope(qkv[..., :groups, :].reshape(b, s, c.n_heads, c.head_dim), positions, c.rope_theta)
    k = llama.rope(qkv[..., groups, :], positions, c.rope_theta)
    v = qkv[..., groups + 1, :]
    start = (0, positions[0], 0, 0)
    keys = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
    values = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
    qf = q.reshape(b, c.n_kv_heads, groups, c.head_dim).astype(jnp.float32)
    scores = jnp.sum(qf[:, None] * keys.astype(jnp.float32)[:, :, :, None, :], axis=-1) / math.sqrt(c.head_dim)  # [b,t,kv,g]
    mask = jnp.arange(keys.shape[1]) <= positions[0]
    scores = jnp.where(mask[None, :, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=1)
    out = jnp.sum(probs[..., None] * values.astype(jnp.float32)[:, :, :, None, :], axis=1)  # [b,kv,g,d]
    out = self.o_proj(out.astype(x.dtype).reshape(b, s, c.n_heads * c.head_dim))
    return llama._reduce_shards(out, c), (keys, values)

def run(nf4, variant):
    llama.Attention.__call__ = v1_call if variant == "V1" else orig_call
    cfg = dataclasses.replace(llama.get_config("llama3-8b"), max_len=16 + 128,
                              nf4_lm_head=nf4)
    model = llama.Llama(cfg, nf4=nf4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.PRNGKey(0), (1, 16), 0, cfg.vocab_size, jnp.int32)
    # fresh jit per variant (the function object differs per patched class? ensure retrace)
    llama._generate = jax.jit(llama._decode, static_argnums=(0, 3))
    jax.block_until_ready(llama.generate(model, prompt, 128))
    best = 1e9
    for _ in range(3):
        t0 = time.perf_counter(); jax.block_until_ready(llama.generate(model, prompt, 128))
        best = min(best, time.perf_counter() - t0)
    trace = trace_call(llama.generate, model, prompt, 128)
    kinds = {k: v / 1e3 / 128 for k, v in device_us_by_kind(trace).items()}
    print(f"== {'nf4+lm_head' if nf4 else 'bf16'} {variant}: {128 / best:.1f} tokens/s; per token ms "
          + " ".join(f"{k} {v:.3f}" for k, v in kinds.items()), flush=True)
    for name, us, n in top_kernels(trace, 60):
        if nf4 and llama_nf4(name):
            continue
        if us / 128 < 2.0:
            break
        print(f"   {us / 128:8.1f} us/token  {n / 128:6.1f} calls/token  {name[:110]}")
    del model

def llama_nf4(name):
    import re
    return re.search(r"jax_nf4|gemv|gemmtile|ksplits", name, re.I) is not None

for nf4, variant in [(True, "V0"), (True, "V1"), (False, "V0"), (False, "V1")]:
    run(nf4, variant)
