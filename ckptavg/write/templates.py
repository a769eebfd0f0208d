"""Where each output of a plan with several rows goes: `-o` as a template with ``{field}`` placeholders, or a
folder with one file per row."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..errors import PlanError
from .output import is_folder_output

_FIELD = re.compile(r"\{(\w*)\}")


class Row(Protocol):
    """What naming an output needs of a row of weights: its name and parameters (``sigma_rel=0.1``)."""

    @property
    def name(self) -> str: ...

    @property
    def params(self) -> Mapping[str, Any]: ...


def row_targets(output: str | os.PathLike[str], rows: Sequence[Row], fmt: str | None = None,
                suffix: str = ".safetensors") -> list[str]:
    """Where each output row goes: `output` itself for one row; for several, a template with ``{field}``
    placeholders (the rows' params, ``index``, ``name``) or a folder (one ``<row name><suffix>`` each; a suffix
    that is a separator makes each row a folder). Format (`fmt`) ``dcp`` writes a folder per row: it takes a
    folder, or a template that ends in a separator.

    Raises:
        PlanError: several rows and `output` is neither a template nor a folder, names an unknown field, or
            gives two rows the same path; format dcp and a template that is not a folder's.
    """
    text = os.fspath(output)
    if len(rows) == 1 and not _FIELD.search(text):
        return [text]
    fields = sorted({k for r in rows for k in r.params} | {"index", "name"})
    if fmt == "dcp" and not text.endswith(os.sep) and (_FIELD.search(text) or not is_folder_output(output)):
        several = len(rows) > 1
        what = f"each of this plan's {len(rows)} outputs ({_names(rows)}) as a folder" if several else "a folder"
        raise PlanError(f"output {text}: format dcp writes {what}; give output a folder template (ending "
                        f"in a separator{', with the fields that vary' if several else ''}), such as "
                        f"{_folder_template(text, rows)!r}; or another format.",
                        params=("output", "format"))
    if not _FIELD.search(text):
        if not is_folder_output(output):
            raise PlanError(f"output {text}: this plan gives {len(rows)} outputs ({_names(rows)}); give output a "
                            f"template with a field that varies ({', '.join('{' + f + '}' for f in fields)}), or a folder.",
                            params=("output",))
        return [f"{Path(text) / (r.name or str(i))}{suffix}" for i, r in enumerate(rows)]
    names = []
    for i, r in enumerate(rows):
        values = {**{k: _text(v) for k, v in r.params.items()}, "index": str(i), "name": r.name}
        unknown = [f for f in _FIELD.findall(text) if f not in values]
        if unknown:
            raise PlanError(f"output {text}: no field {{{unknown[0]}}} in this plan's outputs; it has "
                            f"{', '.join('{' + f + '}' for f in fields)}.", params=("output",))
        names.append(_FIELD.sub(lambda m, v=values: v[m.group(1)], text))  # type: ignore[misc]
    same = [(a, b) for a in range(len(names)) for b in range(a + 1, len(names)) if names[a] == names[b]]
    if same:
        a, b = same[0]
        raise PlanError(f"output {text}: gives outputs {rows[a].name or a} and {rows[b].name or b} the same path "
                        f"{names[a]}; use a field that varies ({', '.join('{' + f + '}' for f in fields)}).",
                        params=("output",))
    return names


def _text(value: object) -> str:
    """A row parameter as it appears in a file name: shortest exact form, no path separators."""
    text = repr(value) if isinstance(value, float) else str(value)
    if "/" in text or os.sep in text or text in ("", ".", ".."):
        raise PlanError(f"the output parameter {text!r} cannot be part of a file name.")
    return text


def _names(rows: Sequence[Row]) -> str:
    return ", ".join(r.name for r in rows[:4]) + (", ..." if len(rows) > 4 else "")


def _folder_template(text: str, rows: Sequence[Row]) -> str:
    """`text` made a folder template (``DIR/{field}/``, ``name-{field}/``) with the fields that vary over `rows`."""
    if _FIELD.search(text):
        return text + os.sep
    varying = [k for k in sorted({k for r in rows for k in r.params}) if len({repr(r.params.get(k)) for r in rows}) > 1]
    field = "-".join("{" + k + "}" for k in [k for k in varying if k != "index"] or ["index"])
    if is_folder_output(text):
        return f"{text.rstrip(os.sep)}{os.sep}{field}{os.sep}" if text.rstrip(os.sep) else f"{field}{os.sep}"
    path = Path(text)
    return str(path.with_name(f"{path.stem}-{field}")) + os.sep
