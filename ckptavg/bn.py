"""BatchNorm recalibration after averaging: `torch.optim.swa_utils.update_bn` semantics, offline.

The running statistics of an average are not the average of running statistics, so they are
recomputed: reset, momentum None (a cumulative mean over batches), train mode, no gradients, one
pass over the user's data; then momenta and mode are restored.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import BatchNormError, CkptavgError, listing
from .read.layouts import open_checkpoint
from .userfn import load_callable


@dataclass(frozen=True)
class BatchNormOptions:
    """How to recompute BatchNorm statistics.

    Attributes:
        model: ``MODULE:FACTORY``; the factory takes no arguments and returns an ``nn.Module`` whose
            state_dict keys match the averaged tensors.
        data: ``MODULE:FACTORY`` returning an iterable of batches, or a safetensors/torch file holding one
            input tensor, split into batches of `batch_size`.
        batches: stop after this many batches (None: all).
        batch_size: batch size for a data file.
        forward: optional ``MODULE:FUNCTION`` called as ``fn(model, batch)`` for models that take dicts or
            several inputs; default ``model(batch[0] if list/tuple else batch)``, as update_bn does.
    """

    model: str
    data: str
    batches: int | None = None
    batch_size: int = 32
    forward: str | None = None

    def __post_init__(self) -> None:
        if self.batches is not None and self.batches < 1:
            raise BatchNormError(f"bn.batches must be >= 1, not {self.batches}.", params=("bn.batches",))
        if self.batch_size < 1:
            raise BatchNormError(f"bn.batch_size must be >= 1, not {self.batch_size}.", params=("bn.batch_size",))

    def check(self) -> None:
        """Resolve the imports now, so a typo fails before any averaging work."""
        load_callable(self.model, "bn.model", BatchNormError)
        if not Path(self.data).is_file():
            load_callable(self.data, "bn.data", BatchNormError)
        if self.forward:
            load_callable(self.forward, "bn.forward", BatchNormError)

    def params(self) -> dict[str, Any]:
        return {"model": self.model, "data": self.data, "batches": self.batches,
                "batch_size": self.batch_size, "forward": self.forward}


def recalibrate(
    weights: dict[str, torch.Tensor], options: BatchNormOptions, device: torch.device | str = "cpu",
    on_step: Callable[[str, int, int], None] | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Recompute the BatchNorm buffers of `weights` on `device`; return only the replaced entries, on the CPU
    in their input dtypes, and the number of batches run. Batches are moved to `device` (tensors inside
    lists, tuples and dicts too)."""
    model = _build_model(options.model)
    _load_strict(model, weights, options.model)
    dev = torch.device(device)
    model.to(dev)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not bns:
        raise BatchNormError(f"bn.model {options.model}: the model has no BatchNorm layer, so there is nothing "
                             "to recalibrate; leave out bn.", params=("bn.model", "bn"))
    forward = load_callable(options.forward, "bn.forward", BatchNormError) if options.forward else _default_forward
    batches = _batches(options)
    if options.batches is not None:
        batches = itertools.islice(batches, options.batches)
    try:
        seen = _run_update(model, bns, (_to(b, dev) for b in batches), forward,
                           (lambda n: on_step("BatchNorm batches", n, options.batches or 0)) if on_step else None)
    except CkptavgError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's model, data or forward failed: one line
        raise BatchNormError(f"BatchNorm pass failed: {type(e).__name__}: {e} (see bn.forward for models "
                             "that do not take the first element of each batch).", params=("bn.forward",)) from e
    if seen == 0:
        raise BatchNormError(f"bn.data {options.data}: yielded no batch.", params=("bn.data",))
    prefixes = {name + "." for name, m in model.named_modules() if isinstance(m, _BatchNorm)}
    state = model.state_dict()
    return {
        k: v.detach().to("cpu", weights[k].dtype)
        for k, v in state.items()
        if any(k.startswith(p) for p in prefixes) and k.rsplit(".", 1)[-1] in
        ("running_mean", "running_var", "num_batches_tracked")
    }, seen


@torch.no_grad()
def _run_update(model: nn.Module, bns: list[_BatchNorm], batches: Iterable[Any],
                forward: Callable[[nn.Module, Any], Any], done: Callable[[int], None] | None = None) -> int:
    momenta = {}
    for m in bns:
        m.reset_running_stats()
        momenta[m] = m.momentum
        m.momentum = None  # cumulative average over batches
    was_training = model.training
    model.train()
    seen = 0
    try:
        for batch in batches:
            forward(model, batch)
            seen += 1
            if done:
                done(seen)
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.train(was_training)
    return seen


def _to(batch: Any, dev: torch.device) -> Any:
    """Move the tensors of a batch to `dev`, as update_bn does with its `device` argument."""
    if dev.type == "cpu":
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(dev, non_blocking=True)
    if isinstance(batch, list | tuple):
        return type(batch)(_to(b, dev) for b in batch)
    if isinstance(batch, dict):
        return {k: _to(v, dev) for k, v in batch.items()}
    return batch


def _default_forward(model: nn.Module, batch: Any) -> Any:
    return model(batch[0] if isinstance(batch, list | tuple) else batch)


def _build_model(spec: str) -> nn.Module:
    factory = load_callable(spec, "bn.model", BatchNormError)
    try:
        model = factory()
    except Exception as e:  # noqa: BLE001 - the user's factory failed: one line, not a traceback
        raise BatchNormError(f"bn.model {spec}: the factory raised {type(e).__name__}: {e}", params=("bn.model",)) from e
    if not isinstance(model, nn.Module):
        raise BatchNormError(f"bn.model {spec}: returned {type(model).__name__}, not an nn.Module.", params=("bn.model",))
    return model


def _load_strict(model: nn.Module, weights: dict[str, torch.Tensor], spec: str) -> None:
    expected = model.state_dict()
    problems = [f"missing '{k}'" for k in expected if k not in weights]
    problems += [f"unexpected '{k}'" for k in weights if k not in expected]
    problems += [f"'{k}' has shape {tuple(weights[k].shape)} but the model has {tuple(v.shape)}"
                 for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    if problems:
        raise BatchNormError(f"bn.model {spec}: the weights do not fit the model: {listing(problems, 10, '; ')}.", params=("bn.model",))
    model.load_state_dict(weights, strict=True)


def _batches(options: BatchNormOptions) -> Iterable[Any]:
    path = Path(options.data)
    if path.is_file():
        inputs = _input_tensor(path)
        return (inputs[i:i + options.batch_size] for i in range(0, len(inputs), options.batch_size))
    factory = load_callable(options.data, "bn.data", BatchNormError)
    try:
        batches: Iterable[Any] = iter(factory())
        return batches
    except Exception as e:  # noqa: BLE001 - the user's data factory failed
        raise BatchNormError(f"bn.data {options.data}: {type(e).__name__}: {e}", params=("bn.data",)) from e


def _input_tensor(path: Path) -> torch.Tensor:
    try:
        tensors = open_checkpoint(path).tensors
    except CkptavgError as e:
        raise BatchNormError(f"bn.data: {e}", params=("bn.data",)) from None
    if len(tensors) != 1:
        raise BatchNormError(f"bn.data {path}: holds {len(tensors)} tensors ({', '.join(list(tensors)[:5])}); "
                             "it must hold exactly one input tensor.", params=("bn.data",))
    tensor = next(iter(tensors.values())).load()
    if tensor.ndim == 0 or len(tensor) == 0:
        raise BatchNormError(f"bn.data {path}: the input tensor is empty.", params=("bn.data",))
    return tensor
