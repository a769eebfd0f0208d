"""The output file at the byte level: a temp file written once from start to end, fast and checksummed.

Three things make writing a large output cheap (bench/RESULTS.md, "writing the output"):
- the whole file is allocated up front, which also finds a full disk before any work is done;
- the kernel is asked to write back every 32 MiB as it goes, so dirty pages never pile up into a
  throttled write() or a long fsync at the end;
- sha256 is computed by a thread that reads the written bytes back from the page cache, so hashing
  runs beside the arithmetic instead of after each block (it also hashes what the file holds).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import queue
import stat
import sys
import tempfile
import threading
from pathlib import Path
from types import TracebackType

from ..errors import OutputError
from ..layout import TensorSpec

TEMP_SUFFIX = ".ckptavg-partial"
WRITEBACK_BYTES = 32 * 2**20
HASH_CHUNK = 256 * 1024
_SYNC_FILE_RANGE_WRITE = 2
_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _linux_call(name: str, *argtypes: type) -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """A libc function the os module does not expose (fallocate, sync_file_range), or None off 64-bit Linux."""
    if sys.platform != "linux" or ctypes.sizeof(ctypes.c_long) != 8:  # the calls take 64-bit off_t
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn


_fallocate = _linux_call("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_sync_file_range = _linux_call("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)


def reserve(fd: int, nbytes: int) -> int:
    """Allocate `nbytes` for the file; 0, or the errno of a failure.

    The raw fallocate call, not os.posix_fallocate: where the file system cannot allocate, glibc's
    fallback would write the whole file an extra time. Such a failure (EOPNOTSUPP) is simply ignored.
    """
    if _fallocate is None or nbytes == 0:
        return 0
    return 0 if _fallocate(fd, 0, 0, nbytes) == 0 else ctypes.get_errno()


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing a range back to disk without waiting for it: a hint, fsync still makes it durable."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


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


class OutputFile:
    """A hidden temp file beside `path` (`.NAME.*.ckptavg-partial`), of a known final size.

    `write` appends; `finish` makes the bytes durable and returns their sha256, leaving the temp file for
    the caller to rename; `discard` removes it. Errors name `path`, the file the user asked for.
    """

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.nbytes = 0
        self._written_back = 0
        try:
            fd, self.temp = temp_beside(path.parent, path.name)
        except OSError as e:
            raise OutputError(f"{path}: cannot create a file in {path.parent} ({e.strerror}).") from None
        self._fd: int | None = fd
        err = reserve(fd, size)
        if err in _OUT_OF_SPACE:
            self.discard()
            raise OutputError(f"{path}: cannot reserve {size} bytes in {path.parent} ({os.strerror(err)}); "
                              "free some space or write elsewhere. Nothing was written.")
        self._hash = _HashBehind(fd)

    def write(self, data: memoryview) -> None:
        assert self._fd is not None
        size = len(data)
        try:
            while data:  # a write may be partial
                data = data[os.write(self._fd, data):]
        except OSError as e:
            raise OutputError(f"{self.path}: write failed ({e.strerror}); nothing was written.") from None
        self.nbytes += size
        self._hash.advance(self.nbytes)
        if self.nbytes - self._written_back >= WRITEBACK_BYTES:
            start_writeback(self._fd, self._written_back, self.nbytes - self._written_back)
            self._written_back = self.nbytes

    def finish(self) -> str:
        """fsync and close the temp file, give it the usual permissions; return the sha256 of its bytes."""
        assert self._fd is not None
        self._hash.advance(self.nbytes, last=True)
        try:
            os.fsync(self._fd)  # the hash thread reads the tail meanwhile
            digest = self._hash.hexdigest()
            usual_mode(self._fd)
            os.close(self._fd)
            self._fd = None
        except OSError as e:
            raise OutputError(f"{self.path}: cannot finish writing ({e.strerror}); nothing was written.") from None
        return digest

    def discard(self) -> None:
        """Stop hashing, close and remove the temp file (safe to call more than once)."""
        if hasattr(self, "_hash"):
            self._hash.stop()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self.temp.unlink(missing_ok=True)


class _HashBehind:
    """sha256 of a file being written, by a thread that preads what has been written so far.

    hashlib and pread release the GIL, so on a second core the hash costs the writer nothing. The writer
    tells the thread how far it has written through a C SimpleQueue, not a Condition: a Ctrl-C on the
    main thread can land just after a Condition's lock was taken in a `with` (its `__enter__` is Python
    code) and leave it held, and then the thread would never wake and `stop` would wait for it forever.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._sha = hashlib.sha256()
        self._ends: queue.SimpleQueue[tuple[int, bool] | None] = queue.SimpleQueue()  # (written, last); None: stop
        self._stopped = False
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="ckptavg-sha256", daemon=True)
        self._thread.start()

    def advance(self, end: int, last: bool = False) -> None:
        self._ends.put((end, last))

    def _run(self) -> None:
        buf = memoryview(bytearray(HASH_CHUNK))
        done = 0
        try:
            while (news := self._newest()) is not None:
                end, last = news
                while done < end and not self._stopped:
                    n = os.preadv(self._fd, [buf[: min(HASH_CHUNK, end - done)]], done)
                    if n == 0:
                        raise OSError(errno.EIO, "the output file is shorter than what was written")
                    self._sha.update(buf[:n])
                    done += n
                if last or self._stopped:
                    return
        except OSError as e:
            self._error = e

    def _newest(self) -> tuple[int, bool] | None:
        """Wait for news, then take all that has queued up: only the furthest end matters."""
        news = self._ends.get()
        while news is not None:
            try:
                later = self._ends.get_nowait()
            except queue.Empty:
                break
            if later is None:
                return None
            news = later
        return news

    def hexdigest(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._sha.hexdigest()

    def stop(self) -> None:
        self._stopped = True
        self._ends.put(None)
        self._thread.join()


class TempWriter:
    """What the streaming writers share: tensors arrive in `order` into an `OutputFile` at a temp name; on
    a clean exit the file is completed (`_complete`), fsynced and hashed, and renamed into place (or, with
    `rename` False, left at `done` for the caller to rename); on any exception, Ctrl-C included, removed."""

    def __init__(self, path: Path, order: list[TensorSpec], rename: bool) -> None:
        self.path = path
        self._rename = rename
        self.done: Path | None = None
        self.order = order
        self._next = 0  # the tensor of `order` being written
        self._filled = 0  # bytes of order[_next] written so far
        self._file: OutputFile | None = None
        self._sha256: str | None = None
        self._placed = False  # the finished file is renamed into place, or handed over as `done`

    @property
    def nbytes(self) -> int:
        return self._file.nbytes if self._file else 0

    @property
    def sha256(self) -> str:
        """The sha256 of the written file (known once the writer has finished)."""
        if self._sha256 is None:
            raise AssertionError("sha256 asked for before the writer finished")
        return self._sha256

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._file is not None
        try:
            if exc_type is None:
                if self._next != len(self.order):
                    raise AssertionError("writer closed before every tensor was written")
                self._complete(self._file)
                self._place(self._file)
        finally:
            if not self._placed:  # failed, or interrupted: leave nothing behind
                self._file.discard()

    def _complete(self, file: OutputFile) -> None:
        """Write what follows the tensors (nothing, for a format whose header comes first)."""

    def _place(self, file: OutputFile) -> None:
        self._sha256 = file.finish()
        if self._rename:
            place(file.temp, self.path, force=True)
        else:
            self.done = file.temp
        self._placed = True
