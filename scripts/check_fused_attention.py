"""On a GPU: cuDNN's fused attention (model.fused_attention) against XLA's on packed rows with padding, in
bfloat16: the attention outputs and their gradients, and a bf16 model's logits and loss gradient with either.
Prints the largest differences and PASS or FAIL against bf16 tolerances; exits 1 on FAIL, 2 without a GPU.

    python scripts/check_fused_attention.py [--batch 8] [--length 512]
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from homegen.model.transformer import Transformer, TransformerConfig, causal_segment_attention


def packed_segments(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """(batch, length) segment ids: each row packs 1-4 sequences and ends in padding (0)."""
    rows = np.zeros((batch, length), np.int32)
    for row in range(batch):
        used = int(length * rng.uniform(0.6, 1.0))
        cuts = np.sort(rng.choice(np.arange(1, used), rng.integers(0, 4), replace=False))
        for segment, (start, stop) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, used]), start=1):
            rows[row, start:stop] = segment
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        print("check_fused_attention.py: no GPU (cuDNN attention runs on NVIDIA GPUs only)", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    segments = jnp.asarray(packed_segments(rng, args.batch, args.length))
    q = jnp.asarray(rng.normal(size=(args.batch, args.length, 12, 64)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(args.batch, args.length, 4, 64)), jnp.bfloat16) for _ in range(2))

    def attend(implementation):
        return lambda q, k, v: causal_segment_attention(q, k, v, segments, implementation=implementation)

    def loss(implementation):
        return lambda q, k, v: jnp.sum(attend(implementation)(q, k, v).astype(jnp.float32) ** 2)

    checks = []
    for name, value in (("attention output", lambda i: jax.jit(attend(i))(q, k, v)),
                        ("attention gradient", lambda i: jax.jit(jax.grad(loss(i), argnums=(0, 1, 2)))(q, k, v))):
        fused, plain = value("cudnn"), value("xla")
        diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                   for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(plain)))
        scale = max(float(jnp.max(jnp.abs(b.astype(jnp.float32)))) for b in jax.tree.leaves(plain))
        checks.append((name, diff, scale))

    cfg = dict(vocab_size=4096, d_model=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, mlp_dim=1024,
               dtype="bfloat16")
    tokens = jnp.asarray(rng.integers(1, 4096, (args.batch, args.length)), jnp.int32)
    positions = jnp.asarray(np.concatenate([np.arange(args.length)[None]] * args.batch), jnp.int32)
    logits = {}
    for fused in (True, False):
        model = Transformer(TransformerConfig(**cfg, fused_attention=fused), nnx.Rngs(0))
        graphdef, state = nnx.split(model)

        def model_loss(state):
            out, _ = nnx.merge(graphdef, state)(tokens, positions, segments)
            return jnp.mean(jax.nn.logsumexp(out.astype(jnp.float32), axis=-1)), out

        (_, out), grads = jax.jit(jax.value_and_grad(model_loss, has_aux=True))(state)
        logits[fused] = (out.astype(jnp.float32), grads)
    diff = float(jnp.max(jnp.abs(logits[True][0] - logits[False][0])))
    checks.append(("model logits", diff, float(jnp.max(jnp.abs(logits[False][0])))))
    grad_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                    zip(jax.tree.leaves(logits[True][1]), jax.tree.leaves(logits[False][1])))
    grad_scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(logits[False][1]))
    checks.append(("model loss gradient", grad_diff, grad_scale))

    ok = True
    print(f"{jax.devices()[0].device_kind}; {args.batch} rows x {args.length} tokens, 1-4 packed sequences a row "
          "and padding; bfloat16")
    for name, diff, scale in checks:
        passed = diff <= 0.02 * max(scale, 1e-6)  # bf16 carries ~3 significant digits; 2% of the largest value
        ok &= passed
        print(f"  {name:<22} largest difference {diff:.3g} (largest value {scale:.3g}): {'PASS' if passed else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
