"""A cheap walk over a pickle's opcodes before the C unpickler runs it.

The C unpickler trusts what a pickle says about sizes: `LONG_BINPUT 4000000000` grows its memo array to
twice that many pointers (tens of gigabytes for a 10-byte pickle), and a length prefix larger than the
data makes it allocate the claimed size before finding the data short. `scan` checks every opcode's
argument against the bytes that are there, and every memo index against the number of opcodes before
it (Python's pickler numbers memo entries 0, 1, 2, ...; more than one per opcode is impossible), so
that what the C unpickler allocates is bounded by a small multiple of the pickle's size.

It reads the arguments only, never builds an object: about 1 ms for the pickle of a 320-tensor state dict
(10 000 opcodes), against 0.5 ms for the C unpickler to run it.
"""

from __future__ import annotations

import functools
import mmap
import pickletools
import struct

Buffer = bytes | bytearray | mmap.mmap

# Text arguments longer than this (an INT or a memo index in decimal) are refused: none that a pickler
# writes comes close, and the C unpickler would convert them whole.
MAX_TEXT_ARGUMENT = 64 * 1024

_FIXED: dict[int, int] = {}  # opcode: bytes of its fixed-size argument
_COUNTED: dict[int, tuple[int, bool]] = {}  # opcode: (bytes, signed) of the little-endian length before its data
_LINES: dict[int, int] = {}  # opcode: newline-terminated lines of its argument
for _op in pickletools.opcodes:
    _code = ord(_op.code)
    _n = _op.arg.n if _op.arg is not None else 0
    if _n >= 0:
        _FIXED[_code] = _n
    elif _n == pickletools.UP_TO_NEWLINE:
        _LINES[_code] = 2 if _op.arg is pickletools.stringnl_noescape_pair else 1
    else:
        _COUNTED[_code] = {pickletools.TAKEN_FROM_ARGUMENT1: (1, False), pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
                           pickletools.TAKEN_FROM_ARGUMENT4U: (4, False), pickletools.TAKEN_FROM_ARGUMENT8U: (8, False)}[_n]

_STOP, _PUT, _BINPUT, _LONG_BINPUT = ord("."), ord("p"), ord("q"), ord("r")

# The opcodes torch's weights-only unpickler (torch/_weights_only_unpickler.py) executes: a pickle with any
# other is refused there, so a fast path that reads it must give it up too, or it would accept more.
TORCH_WEIGHTS_ONLY = frozenset(ord(c) for c in "c\x81Rbaesu(t\x85\x86\x87N\x89\x88)]}\x8fJKMGXUQhjqr\x8a\x80.")


class BadPickle(ValueError):
    """The pickle is malformed, or holds an opcode or argument that the scan does not allow."""


_SPECIAL, _REFUSED = -1, -2  # table entries of opcodes handled off the fast path, and of refused ones


@functools.lru_cache(maxsize=4)
def _widths(allowed: frozenset[int] | None) -> tuple[int, ...]:
    """Per byte value: its fixed argument width, _SPECIAL, or _REFUSED (unknown, or not in `allowed`)."""
    table = []
    for code in range(256):
        if allowed is not None and code not in allowed or (code not in _FIXED and code not in _COUNTED
                                                            and code not in _LINES):
            table.append(_REFUSED)
        elif code in _FIXED and code not in (_STOP, _LONG_BINPUT):
            table.append(_FIXED[code])
        else:
            table.append(_SPECIAL)
    return tuple(table)


def scan(data: Buffer, start: int = 0, allowed: frozenset[int] | None = None) -> int:
    """Walk the pickle that starts at `start` up to its STOP; return the offset just after it.

    `allowed`: the opcodes accepted (None: every opcode pickle defines). Raises BadPickle for an unknown or
    refused opcode, an argument past the end of `data`, or a memo index no pickler would write.
    """
    widths = _widths(allowed)
    end = len(data)
    i, ops = start, 0
    while i < end:
        code = data[i]
        width = widths[code]
        ops += 1
        if width >= 0:  # most opcodes: a fixed-size argument or none
            i += 1 + width
            continue
        if width == _REFUSED:
            raise BadPickle(f"opcode {bytes([code])!r} at byte {i - start}")
        i += 1
        if code == _STOP:
            return i
        if code == _LONG_BINPUT:
            if i + 4 <= end and struct.unpack_from("<I", data, i)[0] > ops:
                raise BadPickle(f"memo index {struct.unpack_from('<I', data, i)[0]} at byte {i - 1 - start}")
            i += 4
        elif code in _COUNTED:
            size, signed = _COUNTED[code]
            if i + size > end:
                break
            length = int.from_bytes(data[i:i + size], "little", signed=signed)
            if length < 0 or i + size + length > end:
                raise BadPickle(f"a length of {length} bytes at byte {i - 1 - start} runs past the data")
            i += size + length
        else:
            for _ in range(_LINES[code]):
                stop = data.find(b"\n", i, min(end, i + MAX_TEXT_ARGUMENT))
                if stop < 0:
                    raise BadPickle(f"unterminated or overlong argument at byte {i - 1 - start}")
                if code == _PUT and not _memo_index_ok(bytes(data[i:stop]), ops):
                    raise BadPickle(f"memo index {bytes(data[i:stop])[:40]!r} at byte {i - 1 - start}")
                i = stop + 1
    raise BadPickle("the pickle ends before its STOP opcode")


def _memo_index_ok(text: bytes, ops: int) -> bool:
    digits = text.strip()
    return digits.isdigit() and len(digits) <= 12 and int(digits) <= ops
