"""Megatron-LM's legacy checkpoints (`--ckpt-format torch`), read without running code.

Each model-parallel rank saves `iter_N/mp_rank_XX/model_optim_rng.pt` (`mp_rank_XX_YYY` with pipeline
parallelism): a torch zip archive of a dict with `model` (that rank's slice of the weights; `model0`,
`model1`, ... with virtual pipeline stages), `optimizer`, `opt_param_scheduler`, `rng_state`, `args` (an
`argparse.Namespace`), `iteration` and `checkpoint_version`. Only the weights are read; the step is
`iteration`. A rank's slice is a checkpoint of its own: averaging is rank by rank, one output per rank.

torch's weights-only loader refuses these files (the Namespace, NumPy's RNG state, Transformer Engine's
`_extra_state` as `io.BytesIO`), so fastpickle's lazy unpickler is extended with inert stand-ins for exactly
those; any other global is refused by name.
"""

from __future__ import annotations

import io
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointFormatError, CkptavgWarning, first_line, one_line
from .checkpoint import Checkpoint, LoadOptions, stamp
from .deepspeed_pickle import unwrap
from .fastpickle import Extended, _Tensor
from .lazy import LazyTensor
from .locate import flatten, locate_weights
from .megatron import legacy_rank_files, megatron_iterations, megatron_step
from .metadata import Meta, meta_from_mapping
from .pickle_scan import scan
from .safe_pickle import Refused, refusal
from .torch_zip import check_torch_zip

LEGACY_FORMAT = "megatron legacy ranks"  # the format of an iter_N folder opened by `open_legacy_iteration`


class Inert:
    """Stand-in for a value that is never used (the args Namespace, NumPy RNG arrays, extra state): unpickling
    only stores its state."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class Namespace(Inert):
    """Stand-in for `argparse.Namespace` (Megatron's `args`)."""


class ExtraState(Inert):
    """Stand-in for `io.BytesIO`: Transformer Engine's serialized `_extra_state` of a module."""


def _encode(text: Any, encoding: Any = "latin1") -> bytes:
    """Replaces `_codecs.encode`, which protocol-2 pickles use to spell bytes: only that use."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("bad _codecs.encode")
    return text.encode("latin1")


_NUMPY = ("numpy.core.multiarray", "numpy._core.multiarray")
ALLOWED: dict[tuple[str, str], Any] = {
    ("argparse", "Namespace"): Namespace,
    ("_io", "BytesIO"): ExtraState,
    ("_codecs", "encode"): _encode,
    **{(m, n): Inert for m in _NUMPY for n in ("_reconstruct", "scalar")},
    ("numpy", "ndarray"): Inert,
    ("numpy", "dtype"): Inert,
}


class _Unpickler(Extended):
    """The lazy tensor unpickler with Megatron's legacy files' names (`ALLOWED`) added."""

    allowed = ALLOWED


def load_legacy(path: Path, trust_pickle: bool = False) -> dict[Any, Any]:
    """Unpickle one `model_optim_rng.pt`, tensors lazy (no tensor data is read)."""
    archive = check_torch_zip(path)
    try:
        if not trust_pickle:
            scan(archive.pickled, 0)
        obj = unwrap(_Unpickler(io.BytesIO(archive.pickled), path, archive.prefix, archive.records, trust_pickle).load())
    except Refused as e:
        raise refusal(path, str(e), "a Megatron checkpoint needs only torch's classes, argparse.Namespace and "
                      "NumPy's RNG state; ") from None
    except KeyError as e:
        raise CheckpointFormatError(f"{path}: the pickle references tensor data {e} that the archive does not hold; "
                                    "the file is corrupt, re-copy the checkpoint.") from None
    except Exception as e:  # noqa: BLE001 - a corrupt pickle raises almost any type
        raise CheckpointFormatError(
            f"{path}: unreadable Megatron checkpoint file ({type(e).__name__}: {first_line(e)[:200]}); "
            "the file may be truncated or corrupt, re-copy the checkpoint."
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path}: holds a {type(obj).__name__} where Megatron writes a dict; not a "
                                    "Megatron checkpoint, or a corrupt one.")
    return obj


def _model_entries(obj: Mapping[Any, Any]) -> list[str]:
    """`model`, or the virtual pipeline stages `model0`, `model1`, ... in order."""
    if isinstance(obj.get("model"), dict):
        return ["model"]
    stages = [k for k in obj if isinstance(k, str) and k[5:].isdigit() and k.startswith("model")]
    return sorted(stages, key=lambda k: int(k[5:]))


def open_megatron_legacy(path: Path, options: LoadOptions = LoadOptions()) -> Checkpoint:
    """Open one rank's `model_optim_rng.pt` lazily: its `model` weights (never optimizer or RNG state), the
    step from `iteration` (else from the `iter_N` folder)."""
    before = stamp(path)
    obj = load_legacy(path, options.trust_pickle)
    if options.key is not None:
        tensors, location, others = locate_weights(path, obj, options.key)
        model: Any = obj
    else:
        names = _model_entries(obj)
        if not names:
            keys = one_line(", ".join(map(str, list(obj)[:12])), 300)
            raise CheckpointFormatError(f"{path}: no 'model' entry (top-level keys: {keys}); a Megatron checkpoint "
                                        "saved without its weights cannot be averaged.")
        model = obj["model"] if names == ["model"] else {n: obj[n] for n in names}
        tensors, location = flatten(path, model), "model" if names == ["model"] else ", ".join(names)
        others = [str(k) for k in obj if k not in names]
        if not tensors:
            raise CheckpointFormatError(f"{path}: '{location}' holds no tensors.")
    extra = _extra_state(model)  # noted once per run (`dcp.extra_state_note`)
    meta = meta_from_mapping(obj, "Megatron checkpoint", path)
    step = megatron_step(path)
    meta = meta.fill(Meta(step, "Megatron iter_N folder" if step is not None else None))
    return Checkpoint(path, "torch-zip", tensors, location, meta, other_entries=others, stamps={path: before},
                      extra_state=extra)


def _extra_state(model: Any) -> list[str]:
    """Dotted names of the `_extra_state` entries that are not tensors (TE's BytesIO, None): they are not in
    the flattened tensors, so they are left out of the output; tensor ones are copied as non-floating tensors."""
    out: list[str] = []
    stack: list[tuple[str, Any]] = [("", model)]
    while stack:
        prefix, node = stack.pop()
        if not isinstance(node, dict):
            continue
        for k, v in node.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict):
                stack.append((name + ".", v))
            elif str(k).rsplit(".", 1)[-1] == "_extra_state" and not isinstance(v, _Tensor | LazyTensor):
                out.append(name)
    return sorted(out)


def legacy_ranks(iterations: list[Path]) -> list[tuple[str, list[Path]]]:
    """Each model-parallel rank's files across `iterations` (legacy `iter_N` folders, in order): what averaging
    rank by rank averages, one output per rank. A run folder may be given alone for its iterations.

    Raises CheckpointFormatError when the iterations do not hold the same ranks (a changed parallelism)."""
    if len(iterations) == 1 and not legacy_rank_files(iterations[0]):
        iterations = megatron_iterations(iterations[0])
    per_iteration = [legacy_rank_files(it) for it in iterations]
    if not per_iteration or not per_iteration[0]:
        raise CheckpointFormatError(f"{iterations[0] if iterations else 'the inputs'}: no legacy Megatron "
                                    "iter_N/mp_rank_XX/model_optim_rng.pt files.")
    ranks = list(per_iteration[0])
    for it, files in zip(iterations, per_iteration, strict=True):
        if list(files) != ranks:
            raise CheckpointFormatError(
                f"{it}: holds ranks {one_line(', '.join(files) or 'none', 200)}, while {iterations[0].name} holds "
                f"{one_line(', '.join(ranks), 200)}; checkpoints saved with a different parallelism cannot be averaged "
                "rank by rank (merge them to one rank with Megatron's tools/checkpoint first)."
            )
    return [(rank, [files[rank] for files in per_iteration]) for rank in ranks]


def is_legacy_iteration(path: Path) -> bool:
    """An `iter_N` folder of legacy rank files (`mp_rank_XX/model_optim_rng.pt`)."""
    return megatron_step(path) is not None and path.is_dir() and bool(legacy_rank_files(path))


def open_legacy_iteration(path: Path, options: LoadOptions = LoadOptions()) -> Checkpoint:
    """Open a legacy `iter_N` folder as one checkpoint of all its ranks' weights, named ``<rank>/<name>``
    (``mp_rank_01/decoder.layers.0.mlp.linear_fc1.weight``): averaging it with other iterations averages rank by
    rank, and `write.training` writes each rank's average back into a copy of its own newest file."""
    ranks = legacy_rank_files(path)
    opened = {rank: open_megatron_legacy(file, options) for rank, file in ranks.items()}
    first = next(iter(opened.values()))
    tensors = {f"{rank}/{name}": t for rank, ckpt in opened.items() for name, t in ckpt.tensors.items()}
    stamps = {p: s for ckpt in opened.values() for p, s in ckpt.stamps.items()}
    warnings.warn(CkptavgWarning(
        f"legacy Megatron checkpoints of {len(ranks)} model-parallel rank(s) ({one_line(', '.join(ranks), 120)}): "
        "averaged rank by rank; a folder output (-o DIR/) gets each rank's average in a copy of its newest file."),
        stacklevel=2)
    return Checkpoint(path, LEGACY_FORMAT, tensors, first.location, first.meta, other_entries=first.other_entries,
                      stamps=stamps)
