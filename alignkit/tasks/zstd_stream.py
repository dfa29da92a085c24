"""Reading a ``.zst`` file as a checked stream: every zstd frame must end where its data says it
does. python-zstandard's ``stream_reader`` ends a truncated frame quietly, as if the file had
ended there, so a cut download would pass for a smaller corpus; here it raises
:class:`TruncatedInput`, naming the file and the byte offset, and a file that is not zstd
data is one :class:`~alignkit.core.errors.DataError`.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, BinaryIO

from alignkit.core.errors import DataError, MissingPackage

_READ_BYTES = 1 << 20


class TruncatedInput(DataError):
    """A zstd frame that the file ends inside of (the documents before it were read)."""

    def __init__(self, path: Path, frame_start: int, end: int) -> None:
        self.path, self.offset = path, end
        super().__init__(f"{path}: truncated: the zstd frame starting at byte {frame_start} ends early at byte {end} "
                         "(end of file): download the file again, or keep the documents before the cut with "
                         "alignkit prepare --allow-truncated")


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of the frames of ``raw``, one after another."""

    def __init__(self, raw: BinaryIO, path: Path) -> None:
        try:
            import zstandard
        except ImportError:
            raise MissingPackage(f"reading {path} needs zstandard: pip install zstandard") from None
        self.raw, self.path, self.errors = raw, path, zstandard.ZstdError
        self.context = zstandard.ZstdDecompressor()
        self.frame: Any = None  # the decompressor of the frame under way (None between frames)
        self.frame_start = self.consumed = 0  # compressed bytes: where that frame began, and read so far
        self.out, self.at = b"", 0  # decompressed bytes not yet handed out

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self.at == len(self.out):
            data = self.raw.read(_READ_BYTES)
            if not data:
                if self.frame is not None:
                    raise TruncatedInput(self.path, self.frame_start, self.consumed)
                return 0
            self.out, self.at = self._decompress(data), 0
        n = min(len(buffer), len(self.out) - self.at)
        buffer[:n] = self.out[self.at : self.at + n]
        self.at += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        pieces = []
        while data:
            if self.frame is None:
                self.frame, self.frame_start = self.context.decompressobj(), self.consumed
            try:
                pieces.append(self.frame.decompress(data))
            except self.errors as err:
                what = "not a zstd file" if self.consumed == 0 else f"damaged zstd data in the frame at byte {self.frame_start}"
                raise DataError(f"{self.path}: {what} ({err}): compress it with zstd, or name it without .zst") from None
            rest = self.frame.unused_data if self.frame.eof else b""
            self.consumed += len(data) - len(rest)
            if self.frame.eof:
                self.frame = None
            data = rest
        return b"".join(pieces)


def zstd_lines(raw: BinaryIO, path: Path) -> io.BufferedReader:
    """The decompressed stream of ``raw`` (a ``.zst`` file), read by lines."""
    return io.BufferedReader(_ZstdFrames(raw, path), buffer_size=_READ_BYTES)


def skip(stream: io.BufferedReader, count: int) -> None:
    """Read and drop ``count`` bytes (a zstd stream has no random access)."""
    while count > 0:
        got = len(stream.read(min(count, _READ_BYTES)))
        if not got:
            return
        count -= got
