"""Reading webdataset tar shards as groups of members that share a key, without reading image bytes.

Owns ``iter_tar_groups``: ``(key, {ext: value})`` for each run of consecutive members with the same
key (webdataset's ``base_plus_ext`` split: ``doc.img0.jpg`` -> key ``doc``, ext ``img0.jpg``).

Every reader (each data-loader worker of each rank) walks the whole shard stream to keep the global
sample order, but only loads its own samples. So for a local, uncompressed tar the walk reads headers
and the small text members (``.txt``, ``.json``, ...) and seeks over image members, which become
``LazyMember(path, offset, size)``; ``read_member`` fetches their bytes when the sample is loaded.
Reading cost per reader is then the headers plus the text, not the whole shard. Remote or compressed
shards are streamed and every member is read (no seeking possible).

Damage is detected during the walk in both modes: a member whose data runs past the end of the file,
an unreadable header, or a walk that ends without the end-of-archive zero block (``tarfile`` takes a
short or invalid header after the first member for the end of the archive, so a shard cut at or inside
a header would otherwise just end early, its later samples lost uncounted) counts ``corrupt_shard``
once; the group being read when it happened is dropped and the groups before it are kept. A missing
local file counts ``missing_reason``.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Optional, Union

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from lvlm.data.skips import SkipCounter

TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error, lzma.LZMAError)
TAR_META = re.compile(r"__[^/]*__($|/)")
"""Tar members webdataset treats as metadata (skipped)."""
LAZY_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "mpo"})
"""Member extensions (the last dot-part) read only when their sample is loaded."""


@dataclass(frozen=True)
class LazyMember:
    """Where a member's bytes are in a local tar file."""

    path: str
    offset: int
    size: int


Value = Union[bytes, LazyMember]


def read_member(value: Value) -> bytes:
    """The bytes of a member; raises OSError when the file changed or is shorter than its header says."""
    if isinstance(value, bytes):
        return value
    with open(value.path, "rb") as f:
        f.seek(value.offset)
        data = f.read(value.size)
    if len(data) != value.size:
        raise OSError(f"{value.path}: member at offset {value.offset} is truncated")
    return data


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _seekable(path: str) -> bool:
    """A local plain tar (not gzip/bz2/xz): its members can be read in place."""
    try:
        with open(path, "rb") as f:
            head = f.read(262)
    except OSError:
        return False
    return len(head) == 262 and head[257:262] == b"ustar"


class _TailReader:
    """A read-only stream that keeps the last ``keep`` bytes it returned, to look at the block where a
    streamed tar walk stopped (the walk itself only reads forward)."""

    def __init__(self, raw: BinaryIO, keep: int = 2 * tarfile.RECORDSIZE) -> None:  # > tarfile's read-ahead
        self.raw, self.keep = raw, keep
        self.tail, self.end = b"", 0  # tail = the bytes [end - len(tail), end) of the stream

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.tail = (self.tail + data)[-self.keep:]
        self.end += len(data)
        return data

    def block_at(self, offset: int) -> Optional[bytes]:
        """Up to one tar block at ``offset`` (reading on if needed); None when it is behind the tail."""
        while self.end < offset + tarfile.BLOCKSIZE and self.read(tarfile.BLOCKSIZE):
            pass
        start = offset - (self.end - len(self.tail))
        return None if start < 0 else self.tail[start:start + tarfile.BLOCKSIZE]

    def close(self) -> None:
        self.raw.close()


class _Prefixed:
    """``head`` followed by the rest of ``raw``: a stream whose first bytes were read to sniff it."""

    def __init__(self, head: bytes, raw: BinaryIO) -> None:
        self.head, self.raw = head, raw

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.raw.read(n)
        if n is None or n < 0:
            data, self.head = self.head + self.raw.read(), b""
            return data
        data, self.head = self.head[:n], self.head[n:]
        return data if len(data) == n else data + self.raw.read(n - len(data))

    def close(self) -> None:
        self.raw.close()


_COMPRESSED = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")), (b"BZh", bz2.BZ2File),
               (b"\xfd7zXZ\x00", lzma.LZMAFile))


def _open_streamed(url: str) -> _TailReader:
    """A streamed shard as plain tar bytes: compressed ones (by magic number) are decompressed here, not by
    tarfile, so the walk's offsets are positions in what _TailReader sees (and a cut-off compressed stream
    raises EOFError)."""
    raw = gopen(url, "rb")
    head = raw.read(6)
    stream = _Prefixed(head, raw)
    for magic, opener in _COMPRESSED:
        if head.startswith(magic):
            return _TailReader(opener(stream))
    return _TailReader(stream)


def _ended_properly(tar: tarfile.TarFile, stream) -> bool:
    """Whether the walk stopped at an end-of-archive zero block (not at a missing or damaged header)."""
    if isinstance(stream, _TailReader):
        block = stream.block_at(tar.offset)
    else:
        stream.seek(tar.offset)
        block = stream.read(tarfile.BLOCKSIZE)
    return block is not None and len(block) == tarfile.BLOCKSIZE and block.count(0) == tarfile.BLOCKSIZE


def iter_tar_groups(url: str, skips: SkipCounter, missing_reason: str = "missing_file"
                    ) -> Iterator[tuple[str, dict[str, Value]]]:
    """See the module docstring. Within a group the first member of each ext wins."""
    path = local_path(url)
    if is_local(path) and not os.path.isfile(path):
        skips.add(missing_reason)
        return
    lazy = is_local(path) and _seekable(path)
    size = os.path.getsize(path) if lazy else None
    try:
        stream = open(path, "rb") if lazy else _open_streamed(path if is_local(path) else url)
    except OSError:
        skips.add(missing_reason)
        return
    key: Optional[str] = None
    group: dict[str, Value] = {}
    try:
        tar = tarfile.open(fileobj=stream, mode="r:" if lazy else "r|")
        for info in tar:
            if not info.isreg() or TAR_META.match(info.name):
                continue
            prefix, suffix = base_plus_ext(info.name)
            if prefix is None:
                continue
            if prefix != key:
                if key is not None:
                    yield key, group
                key, group = prefix, {}
            if lazy and suffix.rsplit(".", 1)[-1].lower() in LAZY_EXTENSIONS:
                if info.offset_data + info.size > size:
                    raise tarfile.ReadError(f"member {info.name!r} is truncated")
                value: Value = LazyMember(path, info.offset_data, info.size)
            else:
                member = tar.extractfile(info)
                value = member.read() if member is not None else b""
                if len(value) != info.size:
                    raise tarfile.ReadError(f"member {info.name!r} is truncated")
            group.setdefault(suffix, value)
            tar.members = []  # do not keep every header in memory
        if not _ended_properly(tar, stream):
            raise tarfile.ReadError(f"{url}: no end-of-archive block at offset {tar.offset} (truncated shard)")
    except TAR_ERRORS:
        skips.add("corrupt_shard")
        key = None
    finally:
        stream.close()
    if key is not None:
        yield key, group
