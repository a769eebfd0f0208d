"""Naming and placing output files: temp names beside the target (within NAME_MAX), the final rename
(exclusive without force, never over anything but a regular file or a link), and the mode files get."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import sys
import tempfile
from pathlib import Path

from ..errors import OutputError

TEMP_SUFFIX = ".ckptavg-partial"

NAME_MAX = 255  # bytes of one path component on Linux, macOS and Windows file systems alike
_RANDOM_PART = 8  # the characters mkstemp adds


def temp_name_prefix(name: str) -> str:
    """The visible part of a temp file's name for `name`: ``.NAME.``, with NAME cut (at a character boundary
    where it is UTF-8) so that the whole temp name, random part and suffix included, fits in NAME_MAX bytes
    for any legal `name`."""
    room = NAME_MAX - len(f"..{TEMP_SUFFIX}") - _RANDOM_PART
    raw = os.fsencode(name)
    if len(raw) > room:
        cut = raw[:room]
        for end in range(room, max(room - 4, 0), -1):  # drop a UTF-8 sequence cut in the middle
            try:
                cut[:end].decode()
            except UnicodeDecodeError:
                continue
            cut = cut[:end]
            break
        name = os.fsdecode(cut)
    return f".{name}."


def temp_beside(folder: Path, name: str) -> tuple[int, Path]:
    """A new hidden temp file for `name` in `folder`: `.NAME.*.ckptavg-partial` (mode 0600), and its fd;
    NAME is cut short for a long `name` (`temp_name_prefix`).

    Once written, `usual_mode` gives it the mode a plain open() would have, before it is renamed."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=temp_name_prefix(name), suffix=TEMP_SUFFIX)
    return fd, Path(tmp)


def _renameat2_call() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """glibc's renameat2 (2.28 and later), or None."""
    if sys.platform != "linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint], ctypes.c_int
    return fn


_renameat2 = _renameat2_call()
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
# renameat2 unknown to the kernel, or RENAME_NOREPLACE unknown to the file system: try a hard link instead
_NO_NOREPLACE = (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)
# a file system without hard links (FAT, some network and FUSE ones): claim the name with O_EXCL instead
_NO_LINK = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.EXDEV, errno.ENOSYS, errno.EACCES)


def check_replaceable(path: Path) -> None:
    """Refuse to replace `path` when it is something other than a regular file or a symbolic link (a
    directory, FIFO, socket or device): even with force, ckptavg only replaces files it could have written.
    A symbolic link, dangling or not, is replaced itself: its target is never written."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise OutputError(f"{path}: cannot be examined ({e.strerror}).") from None
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise OutputError(f"{path}: is {file_kind(mode)}, not a regular file; ckptavg replaces only regular files "
                          "(even with force). Give another output path.", params=("force",))


def file_kind(mode: int) -> str:
    """What a file of `mode` is, for a message: ``a directory``, ``a FIFO``, ..."""
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link")]
    return next((text for test, text in kinds if test(mode)), "not a regular file")


def place(temp: Path, final: Path, force: bool) -> None:
    """Rename the finished `temp` to `final`. With `force`, whatever regular file or link is there is replaced;
    without, the rename is exclusive: if `final` appeared meanwhile (another run writing the same output),
    this raises OutputError saying so and `temp` is left for the caller to remove.

    Exclusive means renameat2(RENAME_NOREPLACE) on Linux; else a hard link made at `final` (which fails if
    the name is taken) and the temp name removed; on a file system without hard links, the name is claimed
    with an empty O_EXCL file that the rename then replaces (visible, empty, for that moment).
    """
    try:
        if force:
            check_replaceable(final)
            os.replace(temp, final)
        else:
            _place_new(temp, final)
    except OutputError:  # itself a FileExistsError
        raise
    except FileExistsError:
        raise OutputError(f"{final}: now exists (created while this run was writing, perhaps by another run); "
                          "pass force to overwrite it. Nothing was written.", params=("force",)) from None
    except OSError as e:
        raise OutputError(f"{final}: cannot finish writing ({e.strerror}); nothing was written.") from None


def _place_new(temp: Path, final: Path) -> None:
    """Rename `temp` to `final` only if `final` does not exist (FileExistsError otherwise)."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(temp), _AT_FDCWD, os.fsencode(final), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in _NO_NOREPLACE:
            raise OSError(err, os.strerror(err), str(final))
    try:
        os.link(temp, final, follow_symlinks=False)
    except OSError as e:
        if e.errno not in _NO_LINK or isinstance(e, FileExistsError):
            raise
    else:
        temp.unlink()
        return
    os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600))
    os.replace(temp, final)


def usual_mode(fd: int) -> None:
    """Give a finished temp file the mode open() would have given it, 0666 less the umask (mkstemp makes
    0600, which would leave shards, sidecars and index readable by their owner only)."""
    os.fchmod(fd, 0o666 & ~_umask())


def _umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc/self/status, since 4.7):
    setting it to read it would, for a moment, give files other threads create the wrong mode."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o077)  # elsewhere: the portable way, with a restrictive value for that moment
    os.umask(umask)
    return umask
