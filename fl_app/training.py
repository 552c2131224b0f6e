"""Local training and evaluation of a model on in-memory numpy data.

The loop is split so a DP-SGD path can reuse it: :func:`make_optimizer` builds
the plain optimizer and :func:`shuffled_batches` the minibatches; a DP client
replaces both with Opacus's ``PrivacyEngine.make_private`` (DP optimizer and a
Poisson-sampled ``DataLoader``) and passes them to :func:`run_epochs`, which only
needs an optimizer and an iterable of ``(x, y)`` batches per epoch.

All randomness comes from an explicit :class:`torch.Generator`: shuffling draws
from it directly, and stochastic layers (dropout) run inside
:func:`torch.random.fork_rng` seeded from it, so torch's global RNG is neither
read nor changed and two runs with equally seeded generators are bit-identical. That
generator is derived from what the server knows (seed, round, partition), which is fine
for plain training but not for anything a privacy guarantee rests on: DP-SGD
(:mod:`fl_app.privacy.dpsgd`) draws its noise and Poisson batches from client-held
keystreams by default, and uses the generator only for dropout.

Everything is built for tiny clients too: no ``DataLoader`` or worker processes,
no copies of the data, one optimizer per call (a few milliseconds in all for a
one-example client).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fl_app.config.schema import ClientTrainConfig, OptimizerName
from fl_app.rng import seeded_global_rng

__all__ = [
    "EvalStats",
    "TrainStats",
    "as_tensors",
    "evaluate",
    "make_optimizer",
    "proximal_term",
    "run_epochs",
    "shuffled_batches",
    "train_local",
]

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TrainStats:
    """Summary of one local training call.

    Attributes
    ----------
    loss : float
        Mean cross-entropy over every example seen in training (all epochs),
        each computed in the forward pass before that batch's update. The
        proximal term is not included.
    accuracy : float
        Fraction of those examples predicted correctly in the same forward passes.
    num_examples : int
        Size of the local training set (the aggregation weight), not multiplied
        by the number of epochs.
    steps : int
        Number of optimizer steps taken.
    """

    loss: float
    accuracy: float
    num_examples: int
    steps: int


@dataclass(frozen=True)
class EvalStats:
    """Summary of an evaluation.

    Attributes
    ----------
    loss : float
        Mean cross-entropy over the examples.
    accuracy : float
        Fraction of examples predicted correctly.
    num_examples : int
        Number of examples evaluated.
    """

    loss: float
    accuracy: float
    num_examples: int


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def as_tensors(
    x: np.ndarray, y: np.ndarray, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert features and labels to ``float32`` / ``int64`` tensors.

    Shares memory with the input when it already has the right dtype and is
    writable and on the CPU.

    Parameters
    ----------
    x : numpy.ndarray
        Features ``[N, ...]``.
    y : numpy.ndarray
        Integer class labels ``[N]``.
    device : torch.device or str, optional
        Where the tensors should live.

    Returns
    -------
    tuple of torch.Tensor
        ``(x, y)`` as tensors.

    Raises
    ------
    ValueError
        If the lengths differ, ``y`` is not one-dimensional or not integer-valued.
    """
    x_np = np.asarray(x)
    y_np = np.asarray(y)
    if y_np.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, found shape {y_np.shape}")
    if x_np.ndim < 1 or x_np.shape[0] != y_np.shape[0]:
        raise ValueError(f"features and labels differ in length: x {x_np.shape}, y {y_np.shape}")
    integral = y_np.dtype.kind in "iu" or (
        y_np.dtype.kind == "f" and bool(np.all(y_np == np.round(y_np)))
    )
    if y_np.size and not integral:
        raise ValueError(f"labels must be integer class ids, found dtype {y_np.dtype}")
    x_np = np.require(x_np, dtype=np.float32, requirements=["C", "W"])
    y_np = np.require(y_np, dtype=np.int64, requirements=["C", "W"])
    return torch.from_numpy(x_np).to(device), torch.from_numpy(y_np).to(device)


def make_optimizer(params: Iterable[nn.Parameter], cfg: ClientTrainConfig) -> torch.optim.Optimizer:
    """Build the plain (non-private) optimizer named by ``cfg.optimizer``.

    Parameters
    ----------
    params : iterable of torch.nn.Parameter
        Parameters to optimise.
    cfg : ClientTrainConfig
        Uses ``optimizer``, ``lr``, ``momentum`` (SGD only; Adam keeps its default
        betas) and ``weight_decay``.

    Returns
    -------
    torch.optim.Optimizer
        ``SGD`` or ``Adam``; the DP path wraps this one in Opacus's DP optimizer.

    Raises
    ------
    ValueError
        If the optimizer name is unknown.
    """
    try:
        name = OptimizerName(cfg.optimizer)
    except ValueError:
        known = ", ".join(o.value for o in OptimizerName)
        raise ValueError(
            f"train.optimizer={cfg.optimizer!r} is unknown; choose one of: {known}"
        ) from None
    if name is OptimizerName.sgd:
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def shuffled_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[Batch]:
    """Yield one epoch of minibatches in an order drawn from ``generator``.

    Every example appears exactly once; the last batch may be smaller. The
    permutation is drawn when the iteration starts.

    Parameters
    ----------
    x, y : torch.Tensor
        Features and labels, same length.
    batch_size : int
        Examples per batch (>= 1).
    generator : torch.Generator
        CPU generator the permutation is drawn from.

    Yields
    ------
    tuple of torch.Tensor
        ``(x_batch, y_batch)``.
    """
    if batch_size < 1:
        raise ValueError(f"train.batch_size must be >= 1, found {batch_size}")
    n = int(y.shape[0])
    if n == 0:
        return
    if n == 1:
        yield x, y
        return
    perm = torch.randperm(n, generator=generator).to(y.device)
    for start in range(0, n, batch_size):
        idx = perm[start : start + batch_size]
        yield x.index_select(0, idx), y.index_select(0, idx)


def proximal_term(
    params: Iterable[torch.Tensor], global_params: Iterable[torch.Tensor]
) -> torch.Tensor:
    """Return ``||w - w_global||^2`` summed over all parameter tensors.

    Parameters
    ----------
    params : iterable of torch.Tensor
        Current (trainable) parameters.
    global_params : iterable of torch.Tensor
        Detached copies of the same parameters at the start of the round.

    Returns
    -------
    torch.Tensor
        A scalar tensor (differentiable with respect to ``params``).
    """
    terms = [(p - g).pow(2).sum() for p, g in zip(params, global_params, strict=True)]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch_batches: Callable[[], Iterable[Batch]],
    epochs: int,
    *,
    proximal_mu: float = 0.0,
) -> tuple[float, int, int, int]:
    """Run the training loop: cross-entropy, optional FedProx term, one step per batch.

    Parameters
    ----------
    model : torch.nn.Module
        The model (put in training mode here).
    optimizer : torch.optim.Optimizer
        Optimizer over the model's parameters (plain, or Opacus's DP optimizer).
    epoch_batches : callable
        Called once per epoch; returns that epoch's iterable of ``(x, y)``
        batches (e.g. :func:`shuffled_batches`, or a Poisson ``DataLoader``).
    epochs : int
        Number of passes.
    proximal_mu : float, optional
        FedProx weight; when > 0, ``mu / 2 * ||w - w_global||^2`` is added to each
        batch's loss, with ``w_global`` a detached copy of the trainable
        parameters taken before the first step.

    Returns
    -------
    tuple
        ``(loss_sum, correct, examples_seen, steps)``: summed cross-entropy and
        correct predictions over every non-empty batch, their example count, and
        the number of optimizer steps.

    Notes
    -----
    The batch loss is the sum of per-example losses divided by the batch size,
    so an empty batch (possible under Poisson sampling) gives a zero loss and
    gradient instead of ``nan`` and still takes an optimizer step, as DP-SGD
    requires (its noise must be added on every step).
    """
    mu = float(proximal_mu)
    if mu < 0:
        raise ValueError(f"proximal_mu must be >= 0, found {proximal_mu}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    global_params = [p.detach().clone() for p in params] if mu > 0 else []
    loss_sum = torch.zeros((), dtype=torch.float64, device=_model_device(model))
    correct = torch.zeros((), dtype=torch.int64, device=loss_sum.device)
    seen = 0
    steps = 0
    for _ in range(int(epochs)):
        for xb, yb in epoch_batches():
            bs = int(yb.shape[0])
            optimizer.zero_grad(set_to_none=True)
            logits = model(xb)
            ce_sum = nn.functional.cross_entropy(logits, yb, reduction="sum")
            loss = ce_sum / bs if bs > 0 else ce_sum
            if mu > 0:
                loss = loss + 0.5 * mu * proximal_term(params, global_params)
            loss.backward()
            optimizer.step()
            steps += 1
            if bs > 0:
                loss_sum += ce_sum.detach()
                correct += (logits.detach().argmax(dim=1) == yb).sum()
                seen += bs
    return float(loss_sum), int(correct), seen, steps


def train_local(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cfg: ClientTrainConfig,
    *,
    generator: torch.Generator,
    proximal_mu: float = 0.0,
) -> TrainStats:
    """Train ``model`` in place on local data with minibatch SGD or Adam.

    Parameters
    ----------
    model : torch.nn.Module
        Model to train; its parameters are updated in place.
    x : numpy.ndarray
        Features ``[N, *input_shape]`` (cast to ``float32``).
    y : numpy.ndarray
        Integer labels ``[N]``.
    cfg : ClientTrainConfig
        ``local_epochs``, ``batch_size``, ``optimizer``, ``lr``, ``momentum``,
        ``weight_decay``.
    generator : torch.Generator
        CPU generator for the shuffling order and for stochastic layers (see the
        module docstring); it is advanced by the call. The global RNG is untouched.
    proximal_mu : float, optional
        FedProx weight (0 disables the proximal term).

    Returns
    -------
    TrainStats
        Mean loss/accuracy over the examples seen, ``N`` and the step count. An
        empty dataset returns zeros without touching the model or the generator.

    Raises
    ------
    ValueError
        On mismatched or malformed data, or invalid hyper-parameters.
    """
    if int(cfg.local_epochs) < 0:
        raise ValueError(f"train.local_epochs must be >= 0, found {cfg.local_epochs}")
    batch_size = int(cfg.batch_size)
    if batch_size < 1:
        raise ValueError(f"train.batch_size must be >= 1, found {cfg.batch_size}")
    device = _model_device(model)
    xt, yt = as_tensors(x, y, device)
    n = int(yt.shape[0])
    if n == 0:
        return TrainStats(loss=0.0, accuracy=0.0, num_examples=0, steps=0)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    # Stochastic layers (dropout) draw from torch's default generator; run them on
    # a forked state seeded from `generator` so the global RNG stays untouched.
    layer_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with seeded_global_rng(layer_seed, device):
        loss_sum, correct, seen, steps = run_epochs(
            model,
            optimizer,
            lambda: shuffled_batches(xt, yt, batch_size, generator),
            int(cfg.local_epochs),
            proximal_mu=proximal_mu,
        )
    if seen == 0:
        return TrainStats(loss=0.0, accuracy=0.0, num_examples=n, steps=steps)
    return TrainStats(loss=loss_sum / seen, accuracy=correct / seen, num_examples=n, steps=steps)


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> EvalStats:
    """Evaluate ``model`` on ``(x, y)`` without gradients, in eval mode.

    The model's previous train/eval mode is restored afterwards.

    Parameters
    ----------
    model : torch.nn.Module
        Model to evaluate.
    x : numpy.ndarray
        Features ``[N, *input_shape]``.
    y : numpy.ndarray
        Integer labels ``[N]``.
    batch_size : int, optional
        Examples per forward pass.

    Returns
    -------
    EvalStats
        Mean cross-entropy and accuracy; all zeros for empty data.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, found {batch_size}")
    xt, yt = as_tensors(x, y, _model_device(model))
    n = int(yt.shape[0])
    if n == 0:
        return EvalStats(loss=0.0, accuracy=0.0, num_examples=0)
    was_training = model.training
    model.eval()
    try:
        loss_sum = 0.0
        correct = 0
        for start in range(0, n, batch_size):
            xb, yb = xt[start : start + batch_size], yt[start : start + batch_size]
            logits = model(xb)
            loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum").double())
            correct += int((logits.argmax(dim=1) == yb).sum())
    finally:
        model.train(was_training)
    return EvalStats(loss=loss_sum / n, accuracy=correct / n, num_examples=n)
