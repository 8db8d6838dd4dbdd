"""A minimal Elman recurrent layer and its hand-derived backpropagation through time (BPTT).

The contrast with a convolution: a convolution reuses one kernel at every *position* of an image, so its weight
gradient is a sum over positions (and examples); an RNN reuses one pair of matrices at every *time step*, so its
weight gradient is a sum over time steps (and examples). BPTT is the ordinary reverse pass of the network
unrolled in time: the cotangent of each hidden state arrives both from the output at that step and from the
next step, through ``w_h``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcnn.functional._registry import register


def _check(op: str, x, h0, w_x, w_h, b) -> None:
    if x.ndim != 3:
        raise ValueError(f"{op}: `x` must have shape (N, T, D), got {tuple(x.shape)}")
    n, _, d = x.shape
    if w_x.ndim != 2 or w_x.shape[0] != d:
        raise ValueError(f"{op}: `w_x` must have shape ({d}, H) to match `x` {tuple(x.shape)}, got {tuple(w_x.shape)}")
    hidden = w_x.shape[1]
    if tuple(w_h.shape) != (hidden, hidden):
        raise ValueError(f"{op}: `w_h` must have shape ({hidden}, {hidden}), got {tuple(w_h.shape)}")
    if tuple(h0.shape) != (n, hidden):
        raise ValueError(f"{op}: `h0` must have shape ({n}, {hidden}), got {tuple(h0.shape)}")
    if b is not None and tuple(b.shape) != (hidden,):
        raise ValueError(f"{op}: `b` must have shape ({hidden},), got {tuple(b.shape)}")


def elman_rnn(x: jax.Array, h0: jax.Array, w_x: jax.Array, w_h: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """The hidden states of an Elman RNN: ``h_t = tanh(x_t @ w_x + h_{t-1} @ w_h + b)`` for ``t = 1 .. T``.

    Args:
      x: the input sequences ``(N, T, D)`` (batch first: for images, ``T`` rows of ``D`` pixels).
      h0: the initial hidden state ``(N, H)``.
      w_x: input-to-hidden weights ``(D, H)``; w_h: hidden-to-hidden weights ``(H, H)``; b: optional ``(H,)``.

    Returns:
      Every hidden state ``(N, T, H)`` (``h_1 .. h_T``; the last one is ``[:, -1]``).
    """
    _check("elman_rnn", x, h0, w_x, w_h, b)
    dtype = jnp.result_type(x, h0, w_x, w_h, *(() if b is None else (b,)))
    x, h0, w_x, w_h = (a.astype(dtype) for a in (x, h0, w_x, w_h))
    inputs = jnp.einsum("ntd,dh->tnh", x, w_x)  # every step's input projection at once, time first
    if b is not None:
        inputs = inputs + b.astype(dtype)[None, None]

    def step(h, projected):
        h = jnp.tanh(projected + h @ w_h)
        return h, h

    _, hs = jax.lax.scan(step, h0, inputs)
    return jnp.swapaxes(hs, 0, 1)


def elman_rnn_vjp(
    x: jax.Array, h0: jax.Array, w_x: jax.Array, w_h: jax.Array, b: jax.Array | None, dy: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """Hand-derived backpropagation through time for :func:`elman_rnn`: ``(dx, dh0, dw_x, dw_h, db)``.

    With ``a_t = x_t w_x + h_{t-1} w_h + b`` and ``h_t = tanh(a_t)``, going backwards from ``t = T``:

    - ``g_t = dy_t + da_{t+1} w_h^T`` (the cotangent of ``h_t``: from its own output and from step ``t+1``;
      ``da_{T+1} = 0``), and ``da_t = g_t * (1 - h_t^2)``;
    - ``dx_t = da_t w_x^T``; ``dh0 = da_1 w_h^T``;
    - ``dw_x = sum_t x_t^T da_t``, ``dw_h = sum_t h_{t-1}^T da_t``, ``db = sum_t sum_n da_t``: one weight, used
      at every step, collects a term from every step (summed over examples too).

    Args:
      x, h0, w_x, w_h, b: the forward's arguments (``b`` may be None); dy: the cotangent of its output
        ``(N, T, H)``.

    Returns:
      Cotangents shaped like ``x, h0, w_x, w_h`` and ``b`` (None when ``b`` is None), each in its primal's dtype.
    """
    _check("elman_rnn_vjp", x, h0, w_x, w_h, b)
    n, steps, _ = x.shape
    hidden = w_x.shape[1]
    if tuple(dy.shape) != (n, steps, hidden):
        raise ValueError(f"elman_rnn_vjp: `dy` must have shape {(n, steps, hidden)}, got {tuple(dy.shape)}")
    dtypes = [a.dtype for a in (x, h0, w_x, w_h)]
    dtype = jnp.result_type(x, h0, w_x, w_h, dy, *(() if b is None else (b,)))
    x, h0, w_x, w_h, dy = (a.astype(dtype) for a in (x, h0, w_x, w_h, dy))
    hs = elman_rnn(x, h0, w_x, w_h, None if b is None else b.astype(dtype))  # recomputed: the residuals
    hs_t = jnp.swapaxes(hs, 0, 1)  # (T, N, H)
    dy_t = jnp.swapaxes(dy, 0, 1)

    def back(da_next, inputs):
        h, dh_out = inputs
        g = dh_out + da_next @ w_h.T  # the cotangent of h_t
        da = g * (1 - h * h)  # through tanh
        return da, da

    da_first, das = jax.lax.scan(back, jnp.zeros((n, hidden), dtype), (hs_t, dy_t), reverse=True)
    h_prev = jnp.concatenate([h0[None], hs_t[:-1]], axis=0)  # h_{t-1} for t = 1 .. T
    dx = jnp.einsum("tnh,dh->ntd", das, w_x)
    dh0 = da_first @ w_h.T
    dw_x = jnp.einsum("ntd,tnh->dh", x, das)  # the sum over time (and examples)
    dw_h = jnp.einsum("tni,tnh->ih", h_prev, das)
    db = None if b is None else jnp.sum(das, axis=(0, 1)).astype(b.dtype)
    dx, dh0, dw_x, dw_h = (g.astype(t) for g, t in zip((dx, dh0, dw_x, dw_h), dtypes, strict=True))
    return dx, dh0, dw_x, dw_h, db


register(elman_rnn, elman_rnn_vjp)
