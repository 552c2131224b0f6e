"""Per-sample gradient norms without per-sample gradients for Conv2d and normalisation.

Opacus 1.6's fast-gradient-clipping path (``grad_sample_mode="ghost"``) asks its
registry ``GradSampleHooksFastGradientClipping.NORM_SAMPLERS`` for each layer's
per-sample gradient *norms*; it ships entries for ``Linear`` and ``Embedding`` only,
so on a CNN it built every convolution's ``B x params`` per-sample gradients anyway
and was slower than hooks (docs/performance.md). This module registers, through
Opacus' own :func:`opacus.grad_sample.register_norm_sampler` (no fork):

* ``Conv2d``: *mixed ghost clipping* (Bu et al., "Scalable and Efficient Training of
  Large Convolutional Neural Networks with Differential Privacy", NeurIPS 2022). With
  the unfolded input ``A_i`` (``T x d``: ``T`` output positions, ``d = C_in k_h k_w``)
  and the output gradient ``G_i`` (``T x p``), the per-sample weight gradient is
  ``G_i^T A_i`` and ``||G_i^T A_i||_F^2 = <A_i A_i^T, G_i G_i^T>`` (the Gram trick,
  ``T^2`` entries per sample); per layer, the Gram trick or the materialised
  ``G_i^T A_i``, whichever costs less time (:func:`conv2d_uses_ghost_norm`: late
  layers, small ``T`` and large ``p d``, take the Gram trick). A ``padding_mode``
  other than ``zeros`` pads ``A_i``'s source as the layer does (Opacus' own conv
  sampler pads with zeros: a zero-padded conv's gradients, docs/architecture.md).
* ``GroupNorm`` / ``LayerNorm``: their per-sample gradients have ``B x C`` entries,
  as small as the activations' statistics, so the norm is taken from them directly.
* ``Linear``: Opacus' own norm (same arithmetic), re-registered so the layer also
  leaves what book-keeping needs.

**Book-keeping** (Bu et al. 2023, "Differentially private optimization on large model
at small cost"): Opacus' ghost step runs a second backward pass of the reweighted loss
``sum_i c_i l_i`` to get the clipped sum. Inside :func:`bookkeeping`, each sampler
above also stores on its parameters a function of the clipping coefficients ``c``
returning ``sum_i c_i g_i`` (a weighted weight-gradient from the stored activations
and output gradients, or the weighted sum of the small per-sample gradients), so
:func:`ghost_backward` needs one backward pass, and that one only towards activations
(no weight gradients), then forms every clipped sum directly. Parameters of layers
without such a sampler (``Embedding``, custom layers) get theirs from a second
backward pass restricted to them. The result is the same clipped sum hooks mode
computes (``c_i = min(1, C / (||g_i|| + 1e-6))``, Opacus' formula), to float
tolerance: only speed and memory change (tests/test_ghost_norms.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Callable, Iterator, Sequence

import torch
from opacus.grad_sample import GradSampleHooksFastGradientClipping, register_norm_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
from opacus.grad_sample.linear import compute_linear_norm_sample
from opacus.utils.module_utils import trainable_modules
from opacus.utils.tensor_utils import unfold2d
from torch import nn
from torch.nn.grad import conv2d_weight

__all__ = [
    "BOOKKEPT",
    "CLIPPED_SUM_ATTR",
    "PER_SAMPLE_ENTRY_COST",
    "backward_targets",
    "bookkeeping",
    "conv2d_uses_ghost_norm",
    "ghost_backward",
    "needs_second_pass",
]

# Parameter attribute: callable(c) -> sum_i c_i * per-sample gradient (set in book-keeping).
CLIPPED_SUM_ATTR = "_fl_clipped_sum"

# Per-sample chunk of a materialised unfold / Gram (bounds the temporary memory).
_CHUNK_ELEMENTS = 1 << 23

_BOOKKEEPING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "fl_app_ghost_bookkeeping", default=False
)

Norms = dict[torch.Tensor, torch.Tensor]
ClippedSum = Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def bookkeeping() -> Iterator[None]:
    """Within: the samplers also leave each parameter's clipped-sum function."""
    token = _BOOKKEEPING.set(True)
    try:
        yield
    finally:
        _BOOKKEEPING.reset(token)


def _keep(param: torch.Tensor, fn: ClippedSum) -> None:
    if _BOOKKEEPING.get() and param.requires_grad:
        setattr(param, CLIPPED_SUM_ATTR, fn)


def _weighted_sum(per_sample: torch.Tensor) -> ClippedSum:
    return lambda c: torch.einsum("n,n...->...", c.to(per_sample.dtype), per_sample)


def _norms_of(per_sample: dict[torch.Tensor, torch.Tensor]) -> Norms:
    out: Norms = {}
    for param, gs in per_sample.items():
        out[param] = gs.reshape(len(gs), -1).norm(2, dim=-1)
        _keep(param, _weighted_sum(gs))
    return out


# Time of writing (and later reading) one per-sample gradient entry, in multiply-adds
# (measured: the ~1M CNN's per-sample gradient bmm takes 191 ms at 92 MB of output and
# 331 ms at 368 MB for the same 5.9 G multiply-adds, 1 thread).
PER_SAMPLE_ENTRY_COST = 76


def conv2d_uses_ghost_norm(layer: nn.Conv2d, output_positions: int) -> bool:
    """Mixed ghost clipping's per-layer choice, by time under book-keeping.

    Per sample, the Gram trick costs ``T^2 (p + d)`` multiply-adds for the two Grams
    plus ``T p d`` for the layer's share of the clipped sum (a weighted weight
    gradient); materialising costs ``T p d`` plus writing and summing ``p d`` entries
    (``PER_SAMPLE_ENTRY_COST`` each). So the Gram trick iff
    ``T^2 (p + d) < PER_SAMPLE_ENTRY_COST p d``. Bu et al.'s rule (``2 T^2 < p d``)
    compares memory for their two-pass step; on the benchmark CNN it also sends the
    16x16 layer to the Gram trick, measured 5-9 % slower a step (docs/performance.md).
    Grouped or string-padded convolutions always materialise.
    """
    if layer.groups != 1 or isinstance(layer.padding, str):
        return False
    p = layer.out_channels
    d = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    return output_positions**2 * (p + d) < PER_SAMPLE_ENTRY_COST * p * d


def _self_padded_input(layer: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """The input as a ``padding_mode != "zeros"`` convolution sees it (then unpadded).

    ``padding_mode`` ``circular``/``reflect``/``replicate`` pads the input itself before
    an unpadded convolution (``nn.Conv2d._conv_forward``); unfolding ``a`` with
    ``layer.padding`` instead would give a zero-padded conv's gradients (1-8 % off).
    """
    pad = layer._reversed_padding_repeated_twice
    return nn.functional.pad(a, pad, mode=layer.padding_mode)


def _unfold(layer: nn.Conv2d, a: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    # (n, d, T): im2col, as the convolution sees its input. Opacus' strided-view unfold
    # measured 1.1-9x faster than torch's im2col (F.unfold) on the benchmark's layers.
    return unfold2d(
        a,
        kernel_size=layer.kernel_size,
        padding=padding,
        stride=layer.stride,
        dilation=layer.dilation,
    )


def _conv2d_weight_norms(
    layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, padding: tuple[int, int]
) -> tuple[torch.Tensor, ClippedSum]:
    """Per-sample weight-gradient norms of a plain ``Conv2d`` and its clipped-sum function.

    Ghost layers keep ``a`` and ``g`` for one weighted weight-gradient (the convolution's
    own backward kernel); the others keep their ``B x p x d`` per-sample gradients.
    Both are computed in batch chunks of at most ``_CHUNK_ELEMENTS`` temporaries.
    """
    n, p = g.shape[0], g.shape[1]
    gm = g.reshape(n, p, -1)  # (n, p, T)
    t = gm.shape[2]
    ghost = conv2d_uses_ghost_norm(layer, t)
    d = a.shape[1] * layer.kernel_size[0] * layer.kernel_size[1]
    per_sample = t * d + (t * t if ghost else p * d)
    step = max(1, _CHUNK_ELEMENTS // max(1, per_sample))
    sq = []
    grads = []
    for lo in range(0, n, step):
        am = _unfold(layer, a[lo : lo + step], padding)  # (m, d, T)
        gc = gm[lo : lo + step]
        if ghost:
            aa = torch.bmm(am.transpose(1, 2), am)  # (m, T, T)
            gg = torch.bmm(gc.transpose(1, 2), gc)
            sq.append((aa * gg).sum(dim=(1, 2)).clamp(min=0))
        else:
            gs = torch.bmm(gc, am.transpose(1, 2))  # (m, p, d)
            sq.append(gs.square().sum(dim=(1, 2)))
            grads.append(gs)
    norms = torch.cat(sq).sqrt()
    if not ghost:
        return norms, _weighted_sum(torch.cat(grads).view(n, *layer.weight.shape))
    weight_shape = layer.weight.shape

    def weight_sum(c: torch.Tensor) -> torch.Tensor:
        scaled = g * c.to(g.dtype).view(-1, 1, 1, 1)
        return conv2d_weight(a, weight_shape, scaled, layer.stride, padding, layer.dilation, 1)

    return norms, weight_sum


@register_norm_sampler(nn.Conv2d)
def compute_conv2d_norm_sample(
    layer: nn.Conv2d, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> Norms:
    """Per-sample gradient norms of a ``Conv2d`` (mixed ghost clipping, module docstring)."""
    a = activations[0].to(backprops.dtype)
    g = backprops
    if layer.padding_mode != "zeros" and a.shape[0] > 0:
        a, padding = _self_padded_input(layer, a), (0, 0)
        if layer.groups != 1 or isinstance(layer.padding, str):
            # Opacus' sampler unfolds with ``layer.padding`` (zeros): give it the padded
            # input and a shallow copy (same parameters) with no padding.
            unpadded = copy.copy(layer)
            unpadded.padding = padding
            return _norms_of(compute_conv_grad_sample(unpadded, [a], g))
    elif layer.groups != 1 or isinstance(layer.padding, str) or a.shape[0] == 0:
        return _norms_of(compute_conv_grad_sample(layer, [a], g))
    else:
        padding = layer.padding  # type: ignore[assignment]
    ret: Norms = {}
    if layer.weight.requires_grad:
        ret[layer.weight], weight_sum = _conv2d_weight_norms(layer, a, g, padding)
        _keep(layer.weight, weight_sum)
    if layer.bias is not None and layer.bias.requires_grad:
        bias_gs = g.sum(dim=(2, 3))  # (n, p)
        ret[layer.bias] = bias_gs.norm(2, dim=-1)
        _keep(layer.bias, _weighted_sum(bias_gs))
    return ret


@register_norm_sampler(nn.GroupNorm)
def compute_group_norm_norm_sample(
    layer: nn.GroupNorm, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> Norms:
    """Per-sample gradient norms of a ``GroupNorm`` (its ``B x C`` per-sample gradients)."""
    return _norms_of(compute_group_norm_grad_sample(layer, list(activations), backprops))


@register_norm_sampler(nn.LayerNorm)
def compute_layer_norm_norm_sample(
    layer: nn.LayerNorm, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> Norms:
    """Per-sample gradient norms of a ``LayerNorm`` (per-sample gradients of its shape)."""
    return _norms_of(compute_layer_norm_grad_sample(layer, list(activations), backprops))


@register_norm_sampler(nn.Linear)
def compute_linear_norm_sample_kept(
    layer: nn.Linear, activations: Sequence[torch.Tensor], backprops: torch.Tensor
) -> Norms:
    """Opacus' ``Linear`` norms, plus the clipped-sum functions book-keeping needs."""
    ret: Norms = compute_linear_norm_sample(layer, list(activations), backprops)
    a = activations[0].to(backprops.dtype)
    g = backprops
    if layer.weight.requires_grad:

        def weight_sum(c: torch.Tensor) -> torch.Tensor:
            return torch.einsum("n...i,n...j->ij", g * _per_row(c, g), a)

        _keep(layer.weight, weight_sum)
    if layer.bias is not None and layer.bias.requires_grad:
        _keep(layer.bias, lambda c: torch.einsum("n...k->k", g * _per_row(c, g)))
    return ret


# Layer types whose samplers above leave a clipped-sum function on every parameter.
BOOKKEPT: frozenset[type[nn.Module]] = frozenset({nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Linear})


def _per_row(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return c.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def needs_second_pass(model: nn.Module) -> bool:
    """Whether a layer with trainable parameters has no book-keeping sampler here
    (``Embedding``, custom layers): :func:`ghost_backward` then keeps the graph for a
    second backward pass restricted to those parameters."""
    return any(type(sub) not in BOOKKEPT for _, sub in trainable_modules(model))


@contextlib.contextmanager
def backward_targets(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect, during a forward pass, the outputs of the first trainable layers.

    Those are the outputs of layers with trainable parameters whose inputs need no
    gradient (the input layer, an embedding). A backward pass towards them reaches
    every trainable layer's output (so every Opacus hook fires) without computing any
    weight gradient nor the gradient of the input batch. Forward hooks see a layer's
    output before Opacus' backward hook wraps it, so the wrapper's hook still runs.
    """
    targets: list[torch.Tensor] = []

    def collect(_m: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        if not (isinstance(output, torch.Tensor) and output.requires_grad):
            return
        if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            targets.append(output)

    handles = [sub.register_forward_hook(collect) for _, sub in trainable_modules(model)]
    try:
        yield targets
    finally:
        for h in handles:
            h.remove()


def ghost_backward(
    hooks: GradSampleHooksFastGradientClipping,
    params: Sequence[nn.Parameter],
    loss_per_sample: torch.Tensor,
    targets: Sequence[torch.Tensor],
    *,
    second_pass: bool = True,
) -> None:
    """Set each ``p.grad`` to its clipped sum ``sum_i c_i g_i`` (book-keeping ghost step).

    ``loss_per_sample`` must come from a forward pass run with ``hooks`` attached
    and inside :func:`backward_targets`, whose ``targets`` the one backward pass
    differentiates towards (activations' gradients only; with no targets it falls back
    to the parameters). The coefficients are Opacus' (``hooks.get_clipping_coef()``);
    ``p.grad`` is then what the second backward pass of Opacus' ghost clipping leaves, and
    ``DPOptimizerFastGradientClipping.pre_step`` noises and scales it.
    ``second_pass=False`` (every layer book-kept, :func:`needs_second_pass`) frees
    the graph during the one backward pass, as a plain step does.

    Raises
    ------
    RuntimeError
        If ``second_pass=False`` and a parameter was left without its clipped sum.
    """
    mean_loss = loss_per_sample.mean()
    towards = list(targets) if targets else list(params)
    with bookkeeping():
        torch.autograd.grad(mean_loss, towards, retain_graph=second_pass, allow_unused=True)
    coef = hooks.get_clipping_coef()
    rest = []
    for p in params:
        fn = p.__dict__.pop(CLIPPED_SUM_ATTR, None)
        if fn is None:
            rest.append(p)
        else:
            p.grad = fn(coef).view_as(p).to(p.dtype)
    if rest and not second_pass:
        raise RuntimeError(
            f"{len(rest)} parameter(s) have no book-kept clipped sum; "
            "call ghost_backward with second_pass=True for this model"
        )
    if rest:
        hooks.disable_hooks()
        try:
            second = torch.sum(coef.to(loss_per_sample.device) * loss_per_sample)
            grads = torch.autograd.grad(second, rest, allow_unused=True)
        finally:
            hooks.enable_hooks()
        for p, gr in zip(rest, grads, strict=True):
            p.grad = torch.zeros_like(p) if gr is None else gr
