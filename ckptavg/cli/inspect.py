"""`ckptavg inspect`: a checkpoint's format, where its weights are, its metadata and its tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .options import AddPrefixOpt, ComponentOpt, JsonOpt, KeepPrefixOpt, KeyOpt, StripPrefixOpt, TrustPickleOpt
from .text import format_inspect
from .values import loading

PathArg = Annotated[Path, typer.Argument(
    metavar="PATH", show_default=False, help="A checkpoint file or Hugging Face checkpoint folder.")]


def inspect(
    path: PathArg, *,
    key: KeyOpt = None, component: ComponentOpt = None, strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None, keep_prefix: KeepPrefixOpt = False, trust_pickle: TrustPickleOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Show a checkpoint's format, where its weights were found, its metadata and its tensors.

    Example:
      ckptavg inspect runs/epoch=3.ckpt
    """
    from ..api import inspect_checkpoint
    from ..results import strict_json

    info = inspect_checkpoint(path, loading(key, keep_prefix, trust_pickle, component, strip_prefix, add_prefix))
    print(json.dumps(strict_json(info), indent=2, allow_nan=False) if json_out else format_inspect(info))
