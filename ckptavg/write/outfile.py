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
import sys
import threading
from pathlib import Path

from ..errors import OutputError
from .placing import temp_beside, usual_mode

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
