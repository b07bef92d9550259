"""The prompt attention a GPU runs (JAX's fused attention, cuDNN's flash kernel there) gives what
the CPU form gives, with the same inputs: grouped-query heads, prompts padded to one length."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jds.model import llama


def test_the_gpu_form_of_prompt_attention_equals_the_cpu_form(monkeypatch):
    b, t, heads, kv_heads, hd = 3, 24, 8, 2, 16
    q, k, v = (jax.random.normal(key, shape) for key, shape in zip(
        jax.random.split(jax.random.key(0), 3), [(b, t, heads, hd), (b, kv_heads, t, hd), (b, kv_heads, t, hd)]
    ))  # fmt: skip
    lengths = jnp.array([24, 7, 1], jnp.int32)
    cpu = llama.prompt_attention(q, k, v, lengths)
    monkeypatch.setattr(llama.jax, "default_backend", lambda: "gpu")  # on a CPU, JAX's fused attention runs its XLA form
    gpu = llama.prompt_attention(q, k, v, lengths)
    for row, n in enumerate(lengths.tolist()):  # positions past a prompt are padding: nobody reads them
        np.testing.assert_allclose(np.asarray(gpu[row, :n]), np.asarray(cpu[row, :n]), atol=1e-5)
    assert not np.allclose(np.asarray(gpu[0]), np.asarray(gpu[1]))  # the rows are not all the same
