"""WebDataset shards made on the fly with tarfile: members in the order given, and ways to break a shard."""

from __future__ import annotations

import io
import tarfile


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar holding `members` (name, bytes) in order, ended as tarfile ends it (zero blocks)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0  # the same members always make the same bytes
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def member_span(shard: bytes, name: str) -> tuple[int, int]:
    """(offset, size) of a member's data in a tar."""
    with tarfile.open(fileobj=io.BytesIO(shard), mode="r:") as tar:
        info = tar.getmember(name)
        return info.offset_data, info.size


def cut_inside(shard: bytes, name: str) -> bytes:
    """The shard truncated halfway through member `name`'s data (a copy that stopped early)."""
    offset, size = member_span(shard, name)
    return shard[:offset + size // 2]
