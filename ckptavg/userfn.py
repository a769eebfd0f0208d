"""Import a user's function from ``MODULE:NAME``: a dotted module importable from the current
directory, or the path of a .py file."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import CkptavgError


def load_callable(spec: str, option: str, error: type[CkptavgError]) -> Callable[..., Any]:
    """Return the callable named by `spec`; raise `error` naming `option` and the fix otherwise."""
    module_part, sep, name = spec.rpartition(":")
    if not sep or not module_part or not name:
        raise error(f"{option} must look like MODULE:FUNCTION or path/to/file.py:FUNCTION, not {spec!r}.", params=(option,))
    try:
        module = _import(module_part)
    except SystemExit as e:  # sys.exit() at import would otherwise end ckptavg silently with the module's code
        raise error(f"{option} {spec}: importing {module_part!r} called sys.exit({e.code!r}); a module to import "
                    "must not exit.", params=(option,)) from None
    except Exception as e:  # noqa: BLE001 - any failure inside the user's module is reported, not raised
        raise error(f"{option} {spec}: cannot import {module_part!r} ({type(e).__name__}: {e}).", params=(option,)) from None
    target = getattr(module, name, None)
    if target is None:
        raise error(f"{option} {spec}: {module_part!r} has no attribute {name!r}.", params=(option,))
    if not callable(target):
        raise error(f"{option} {spec}: {name!r} is not callable.", params=(option,))
    return target  # type: ignore[no-any-return]


def _import(module_part: str) -> Any:
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise FileNotFoundError(f"no file {path}")
        mod_name = f"ckptavg_user_{path.stem}_{abs(hash(path.resolve()))}"
        if mod_name in sys.modules:  # run a user's file once, however many options name it
            return sys.modules[mod_name]
        spec = importlib.util.spec_from_file_location(mod_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[mod_name]  # a failed import is not cached: the next attempt runs the file again
            raise
        return module
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # "importable from the current directory", as with python -m
    return importlib.import_module(module_part)
