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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import torch

from fedsteer.models.arch import LayerModules

__all__ = [
    "COEF_ROWS", "Activations", "RowGroups", "Steering", "capture", "initial_coefficients",
    "hooked", "inject", "inject_rows",
]

#: Row order of the `[4, L]` coefficient tensor (lam scales the vector, beta the output).
COEF_ROWS = ("lam_attn", "beta_attn", "lam_mlp", "beta_mlp")


def initial_coefficients(num_layers: int, lam: float, beta: float) -> torch.Tensor:
    """The `[4, L]` coefficients every layer starts from (I2CL: lam 0.1, beta 1.0): float32
    on the CPU, the master copy a client trains and sends, whatever the model runs in."""
    return torch.tensor([lam, beta, lam, beta], dtype=torch.float32, device="cpu")[:, None].repeat(
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
def hooked(registrations) -> Iterator[None]:
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
    with hooked(registrations):
        yield acts


@dataclass(frozen=True)
class RowGroups:
    """Which rows of a concatenated batch belong to which party, for client-batched steps.

    Group g owns rows `spans[g] = (start, stop)` and was left-padded, alone, to `widths[g]`
    tokens: the width it would have had in a forward of its own, so what it draws (noise)
    and computes matches that forward.
    """

    spans: tuple[tuple[int, int], ...]
    widths: tuple[int, ...]

    @property
    def rows(self) -> int:
        return self.spans[-1][1] if self.spans else 0

    @cached_property
    def index(self) -> torch.Tensor:
        """`[rows]`: each row's group."""
        return torch.cat([torch.full((stop - start,), g, dtype=torch.long, device="cpu")
                          for g, (start, stop) in enumerate(self.spans)])


@dataclass
class Steering:
    """What the injection hooks read at every forward: coefficients per group `[G, 4, L]`,
    the row groups (None: the whole batch is one group) and one noise generator per group.
    A client-batched loop sets these before each forward; `inject` sets them once."""

    coef: torch.Tensor
    groups: RowGroups | None = None
    generators: Sequence[torch.Generator | None] = ()
    noise: float = 0.0

    def row_coefficients(self, rows: tuple[int, int], layer: int, batch: int) -> tuple:
        """(lam, beta) per row, shaped to broadcast over `[batch, tokens, d]`."""
        coef = self.coef[:, list(rows), layer]  # [G, 2]
        if self.groups is not None:
            coef = coef[self.groups.index.to(coef.device)]
        else:
            coef = coef.expand(batch, 2)
        return coef[:, 0, None, None], coef[:, 1, None, None]

    def noise_like(self, steered: torch.Tensor) -> torch.Tensor:
        """N(0, 1) per token, each group drawn from its own generator over its own width.

        Drawn in float32 where the generator lives (the CPU), then cast and moved: the same
        seed gives the same noise in every dtype and on every device."""
        if self.groups is None:
            gen = self.generators[0] if self.generators else None
            return _gaussian(tuple(steered.shape), gen).to(steered.device, steered.dtype)
        gauss = torch.zeros_like(steered)
        for (start, stop), width, gen in zip(self.groups.spans, self.groups.widths,
                                             self.generators, strict=True):
            gauss[start:stop, steered.shape[1] - width:] = _gaussian(
                (stop - start, width, steered.shape[2]), gen).to(steered.device, steered.dtype)
        return gauss


def _gaussian(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, dtype=torch.float32, device=device)


def _steer_hook(vector, steering: Steering, rows: tuple[int, int], layer: int, is_tuple):
    """`out <- beta*out + lam*v` (+ noise scaled by each token's output norm, for robustness).

    The coefficients are read at every call, not once: each forward then builds its own
    small graph to them, so an optimizer may update them in place between forwards, and a
    client-batched loop may hand in a new stack of them.
    """

    def hook(module, args, output):
        out = _tensor_of(output, is_tuple)
        lam, beta = steering.row_coefficients(rows, layer, out.shape[0])
        like = {"device": out.device, "dtype": out.dtype}  # float32 masters, cast per forward
        steered = beta.to(**like) * out + lam.to(**like) * vector.to(**like)
        if steering.noise > 0:
            scale = steered.detach().norm(dim=-1, keepdim=True) * steering.noise
            steered = steered + steering.noise_like(steered) * scale
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
    if tuple(coef.shape) != (len(COEF_ROWS), len(_layers(lm))):
        raise ValueError(f"coefficients must be {(len(COEF_ROWS), len(_layers(lm)))}, "
                         f"got {tuple(coef.shape)}")
    steering = Steering(coef[None], None, [generator], noise)
    with inject_rows(lm, attn, mlp, steering):
        yield


@contextmanager
def inject_rows(lm, attn: torch.Tensor, mlp: torch.Tensor, steering: Steering) -> Iterator[None]:
    """`inject` with per-row coefficients: row r of a forward uses `steering.coef[group(r)]`
    (client-batched calibration: many clients' coefficients, one forward)."""
    layers = _layers(lm)
    expected = (len(layers), lm.hidden_size)
    if tuple(attn.shape) != expected or tuple(mlp.shape) != expected:
        raise ValueError(
            f"context vectors must be {expected}, got {tuple(attn.shape)} / {tuple(mlp.shape)}"
        )
    registrations = []
    for lay in layers:
        i, is_tuple = lay.index, lay.attention_returns_tuple
        registrations.append((lay.attention, _steer_hook(attn[i], steering, (0, 1), i, is_tuple)))
        registrations.append((lay.mlp, _steer_hook(mlp[i], steering, (2, 3), i, False)))
    with hooked(registrations):
        yield
