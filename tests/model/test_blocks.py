"""Building blocks of rdt_jax.model.blocks that the parity tests do not isolate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import checkpoint_policies, print_saved_residuals

from rdt_jax.model import blocks


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_named_cond_kv_is_the_identity_and_passes_the_gradient_through(dtype):
    """16-bit K/V are named through their bit pattern (so the remat scan stacks them as uint16):
    the value and its cotangent must come through bit for bit."""
    x = jax.random.normal(jax.random.key(0), (2, 7, 3, 4)).astype(dtype)
    ct = jax.random.normal(jax.random.key(1), x.shape).astype(dtype)
    y, vjp = jax.vjp(blocks._name_cond_kv, x)
    (dx,) = vjp(ct)
    assert y.dtype == dtype and dx.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(x, np.float32))
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(ct, np.float32))


def test_named_cond_kv_is_what_the_policy_saves_as_uint16(capsys):
    """Under ``save_only_these_names(COND_KV_NAME)`` the saved residual of a bf16 K/V is its uint16
    bit pattern (and the value it replaces is not recomputed from the product)."""
    policy = checkpoint_policies.save_only_these_names(blocks.COND_KV_NAME)
    w = jnp.ones((4, 4), jnp.bfloat16)

    def f(x):
        return jnp.sum(blocks._name_cond_kv(x @ w).astype(jnp.float32) ** 2)

    x = jnp.ones((3, 4), jnp.bfloat16)
    print_saved_residuals(jax.checkpoint(f, policy=policy), x)
    saved = [line for line in capsys.readouterr().out.splitlines() if "cond_kv" in line]
    assert saved and all(line.startswith("u16[3,4]") for line in saved), saved
