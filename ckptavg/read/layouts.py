"""Which layout a path is (a file; a Hugging Face, diffusers, PEFT, DCP or DeepSpeed folder; a folder of several
models), and opening it as a `Checkpoint`.

A new layout is one module in `read/` plus a rule here.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointFormatError, one_line
from .checkpoint import Checkpoint, LoadOptions, PathLike
from .components import check_no_component, components, is_component_folder, open_component
from .dcp import is_dcp_folder, open_dcp_folder
from .deepspeed import deepspeed_tag_of, is_deepspeed_tag, open_deepspeed
from .files import open_file, refuse_training_state, training_state
from .hf_folder import is_hf_folder, open_hf_folder
from .lazy import LazyTensor
from .locate import change_prefix, strip_prefixes
from .megatron import is_torch_dist, megatron_step, open_megatron_folder
from .megatron_legacy import is_legacy_iteration, open_legacy_iteration, open_megatron_legacy
from .safetensors_file import sniff


def is_checkpoint_folder(path: Path) -> bool:
    """A folder that is one checkpoint (Hugging Face, diffusers, PEFT, DCP, a DeepSpeed tag, or several models),
    not a folder of checkpoints."""
    return (is_hf_folder(path) or is_dcp_folder(path) or is_deepspeed_tag(path) or is_component_folder(path)
            or is_legacy_iteration(path))


def open_checkpoint(path: PathLike, options: LoadOptions = LoadOptions()) -> Checkpoint:
    """Open one checkpoint file or folder lazily: read its index and metadata, no tensor data."""
    path = Path(path)
    if not path.exists():
        raise CheckpointFormatError(f"{path}: no such file or directory.")
    found: dict[str, Path] = {}
    if path.is_dir():
        if found := components(path):
            ckpt = open_component(path, found, options)
        elif is_hf_folder(path):
            ckpt = open_hf_folder(path, options)
        elif is_torch_dist(path):  # a Megatron iter_N/ folder: DCP, with Megatron's step and backend check
            ckpt = open_megatron_folder(path, options)
        elif is_dcp_folder(path):
            ckpt = open_dcp_folder(path, options)
        elif is_deepspeed_tag(path):
            ckpt = open_deepspeed(path, options)
        elif is_legacy_iteration(path):  # a Megatron iter_N/ of mp_rank_XX/model_optim_rng.pt files
            ckpt = open_legacy_iteration(path, options)
        else:
            raise CheckpointFormatError(
                f"{path}: is a directory, not a checkpoint folder (no model.safetensors, pytorch_model.bin, "
                "diffusion_pytorch_model.safetensors, adapter_model.safetensors or .metadata)."
            )
    elif path.name == "model_optim_rng.pt" and megatron_step(path) is not None:
        ckpt = open_megatron_legacy(path, options)
    elif (tag := deepspeed_tag_of(path)) is not None:
        raise CheckpointFormatError(f"{path}: one file of the DeepSpeed checkpoint {tag}; give the folder {tag} "
                                    "(or the run folder) instead: its weights are spread over the tag's files.")
    elif (what := training_state(path)) is not None:
        raise refuse_training_state(path, what)
    else:
        fmt = sniff(path)
        if fmt is None:
            size = path.stat().st_size
            why = "empty file" if size == 0 else "unknown format"
            raise CheckpointFormatError(f"{path}: not a checkpoint ({why}).")
        ckpt = open_file(path, fmt, options)
    if not found:
        check_no_component(path, ckpt, options.component)
    if not ckpt.tensors:
        raise CheckpointFormatError(f"{path}: holds no tensors.")
    # Pickled layouts only: ZeRO-3 model states hold 0-element placeholders; a safetensors file of empty
    # tensors was written as such.
    if "safetensors" not in ckpt.format and all(t.numel == 0 for t in ckpt.tensors.values()):
        raise CheckpointFormatError(
            f"{path}: the {ckpt.format} weights at '{ckpt.location}' are {len(ckpt.tensors)} tensors of 0 elements "
            "(placeholders, not weights); pass key or component to choose the real weights.", params=("key", "component")
        )
    if not options.keep_prefix:
        ckpt.tensors, ckpt.stripped_prefix = strip_prefixes(ckpt.tensors)
    ckpt.tensors = change_prefix(path, ckpt.tensors, options.strip_prefix, options.add_prefix)
    _check_names(path, ckpt.tensors, ckpt.stripped_prefix)
    return ckpt


def _check_names(path: Path, tensors: dict[str, LazyTensor], stripped: str) -> None:
    """Names every output format can hold: valid Unicode (safetensors headers are UTF-8 JSON), and not
    safetensors' reserved `__metadata__`, which would make the output unreadable."""
    if "__metadata__" in tensors:
        if stripped:
            raise CheckpointFormatError(
                f"{path}: without its prefix '{stripped}' a tensor is named '__metadata__', which safetensors "
                "reserves for file metadata; pass keep_prefix, or rename it in the checkpoint.", params=("keep_prefix",)
            )
        raise CheckpointFormatError(
            f"{path}: a tensor is named '__metadata__', which safetensors reserves for file metadata; "
            "rename it in the checkpoint."
        )
    for name in tensors:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise CheckpointFormatError(f"{path}: a tensor name is not valid Unicode ('{one_line(name, 120)}').") from None
