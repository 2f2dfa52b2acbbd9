"""Read and rewrite each layer's residual-stream writers with forward hooks.

Activation steering (I2CL, IFed-ICL) needs two things from a frozen model:

* `capture(lm)`: every layer's attention and MLP outputs (what each adds to the residual
  stream), to build context vectors from demonstrations.
* `inject(lm, attn, mlp, coef)`: at every token, `out <- beta * out + lam * v`, per layer and
  per module, with `coef` a `[4, L]` tensor whose rows are `COEF_ROWS`. The coefficients may
  require grad: the hooks are plain differentiable elementwise ops (no loops over tokens),
  so the same context serves calibration (with `noise`) and inference.

Where the modules live per architecture is `fedsteer.models.arch`'s business; here we only
honour `attention_returns_tuple` (the tensor is element 0). Both context managers always
remove their hooks, also when the body raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from fedsteer.models.arch import LayerModules

__all__ = ["COEF_ROWS", "Activations", "capture", "initial_coefficients", "inject"]

#: Row order of the `[4, L]` coefficient tensor (lam scales the vector, beta the output).
COEF_ROWS = ("lam_attn", "beta_attn", "lam_mlp", "beta_mlp")


def initial_coefficients(num_layers: int, lam: float, beta: float) -> torch.Tensor:
    """The `[4, L]` coefficients every layer starts from (I2CL: lam 0.1, beta 1.0)."""
    return torch.tensor([lam, beta, lam, beta], dtype=torch.float32)[:, None].repeat(
        1, num_layers
    )


@dataclass
class Activations:
    """Per layer, the `[batch, tokens, d]` attention and MLP outputs of the last forward."""

    attn: list[torch.Tensor | None] = field(default_factory=list)
    mlp: list[torch.Tensor | None] = field(default_factory=list)


def _tensor_of(output, is_tuple: bool) -> torch.Tensor:
    """The residual contribution; a table row that disagrees with the module fails loudly."""
    if isinstance(output, tuple) != is_tuple:
        raise TypeError(
            f"hooked module returned a {type(output).__name__}, but fedsteer.models.arch says "
            f"attention_returns_tuple={is_tuple}: fix the architecture's row"
        )
    return output[0] if is_tuple else output


def _with_tensor(output, tensor: torch.Tensor, is_tuple: bool):
    return (tensor, *output[1:]) if is_tuple else tensor


def _layers(lm) -> list[LayerModules]:
    return lm.layers


@contextmanager
def _hooked(registrations) -> Iterator[None]:
    """Register `(module, hook)` pairs; remove every handle on the way out, whatever happens."""
    handles = []
    try:
        for module, hook in registrations:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture(lm) -> Iterator[Activations]:
    """Collect each layer's attention and MLP outputs (detached) from forwards in the body."""
    layers = _layers(lm)
    acts = Activations(attn=[None] * len(layers), mlp=[None] * len(layers))

    def recorder(store: list, index: int, is_tuple: bool):
        def hook(module, args, output):
            store[index] = _tensor_of(output, is_tuple).detach()

        return hook

    registrations = []
    for lay in layers:
        registrations.append(
            (lay.attention, recorder(acts.attn, lay.index, lay.attention_returns_tuple))
        )
        registrations.append((lay.mlp, recorder(acts.mlp, lay.index, False)))
    with _hooked(registrations):
        yield acts


def _steer_hook(vector, coef, rows: tuple[int, int], layer: int, is_tuple, noise, generator):
    """`out <- beta*out + lam*v` (+ noise scaled by each token's output norm, for robustness).

    The coefficients are indexed at every call, not once: each forward then builds its own
    small graph to `coef`, so an optimizer may update `coef` in place between forwards.
    """

    def hook(module, args, output):
        out = _tensor_of(output, is_tuple)
        lam, beta = coef[rows[0], layer].to(out.dtype), coef[rows[1], layer].to(out.dtype)
        steered = beta * out + lam * vector.to(out.dtype)
        if noise > 0:
            scale = steered.detach().norm(dim=-1, keepdim=True) * noise
            gauss = torch.randn(
                steered.shape, generator=generator, dtype=steered.dtype, device=steered.device
            )
            steered = steered + gauss * scale
        return _with_tensor(output, steered, is_tuple)

    return hook


@contextmanager
def inject(
    lm,
    attn: torch.Tensor,
    mlp: torch.Tensor,
    coef: torch.Tensor,
    *,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> Iterator[None]:
    """Steer every forward in the body with context vectors `attn`, `mlp` `[L, d]`.

    `coef` is `[4, L]` (rows `COEF_ROWS`); gradients flow to it when it requires grad.
    `noise > 0` adds `N(0, 1) * noise * ||out||` per token (I2CL's calibration noise).
    """
    layers = _layers(lm)
    expected = (len(layers), lm.hidden_size)
    if tuple(attn.shape) != expected or tuple(mlp.shape) != expected:
        raise ValueError(
            f"context vectors must be {expected}, got {tuple(attn.shape)} / {tuple(mlp.shape)}"
        )
    if tuple(coef.shape) != (len(COEF_ROWS), len(layers)):
        raise ValueError(f"coefficients must be {(len(COEF_ROWS), len(layers))}, got {coef.shape}")
    registrations = []
    for lay in layers:
        i, is_tuple = lay.index, lay.attention_returns_tuple
        registrations.append(
            (lay.attention, _steer_hook(attn[i], coef, (0, 1), i, is_tuple, noise, generator))
        )
        registrations.append(
            (lay.mlp, _steer_hook(mlp[i], coef, (2, 3), i, False, noise, generator))
        )
    with _hooked(registrations):
        yield
