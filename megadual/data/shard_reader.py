"""Sequential reading of one token shard by sample position, skipping unwanted samples cheaply.

Legend: a position is a sample's index in the tar (0 = the first key); no tensors here.

The loader asks for an increasing list of positions; samples it does not want are passed over
by reading their tar headers only (the data is seeked over), which keeps resuming mid-shard
and splitting a shard by sample cheap.

Reads use the standard library's `tarfile` on a seekable local (or shared-filesystem) file;
the bytes are plain webdataset, so `webdataset.WebDataset` reads the same shards.

Truncation is detected three ways, because `tarfile` treats a tar cut inside a header as a
normal end: a read error inside a member's data, fewer samples than the manifest lists, and
a missing end-of-archive marker (two zero blocks).
"""

from __future__ import annotations

import os
import tarfile
from typing import Iterator, Union

from .token_shards import TokenShardError

_END_OF_ARCHIVE = 1024  # two 512-byte zero blocks

ReadResult = Union[dict[str, bytes], TokenShardError]


def _split_name(name: str) -> tuple[str, str]:
    """('dir/key', 'field.ext') from a member name: webdataset splits the base name at its first dot."""
    directory, _, base = name.rpartition("/")
    key, _, fieldname = base.partition(".")
    return (f"{directory}/{key}" if directory else key), fieldname


class ShardCursor:
    """An open shard read forward by sample position.

    Args:
        path: the tar file.
        name: how errors name the shard (e.g. its path).
        num_samples: how many samples the manifest lists for it.
    """

    def __init__(self, path: str, name: str, num_samples: int):
        self.path, self.name, self.num_samples = path, name, num_samples
        self._tar: tarfile.TarFile | None = None
        self._next_member: tarfile.TarInfo | None = None
        self._position = 0  # position of the sample whose first member is _next_member
        self._failure: TokenShardError | None = None  # set once the shard is found truncated
        self._last_key: str | None = None

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self._tar, self._next_member, self._position, self._last_key = None, None, 0, None

    def _fail(self, problem: str) -> TokenShardError:
        after = f" after sample {self._last_key!r}" if self._last_key else ""
        self._failure = TokenShardError(
            self.name, None, f"{problem} at sample position {self._position}{after} (truncated or damaged tar)"
        )
        return self._failure

    def _member(self) -> tarfile.TarInfo | None:
        """The next file member, or None at the end of the archive."""
        while True:
            info = self._tar.next()
            # next() appends every header to .members; a long shard would hold them all.
            self._tar.members = []
            if info is None or info.isfile():
                return info

    def _open(self) -> None:
        self.close()
        self._failure = None
        try:
            self._tar = tarfile.open(self.path, mode="r:")
            self._next_member = self._member()
        except (tarfile.TarError, EOFError, OSError) as exc:
            self._tar = None
            self._fail(f"cannot open tar ({exc})")

    def _group(self, want: bool) -> tuple[str, dict[str, bytes]] | None:
        """Consume the sample at the current position; its payloads when `want`, else {}."""
        first = self._next_member
        if first is None:
            # tarfile stops quietly at a cut header: the manifest count says whether that was the end.
            self._fail(f"the tar ends after {self._position} of {self.num_samples} samples")
            return None
        key, _ = _split_name(first.name)
        files: dict[str, bytes] = {}
        member = first
        try:
            while member is not None and _split_name(member.name)[0] == key:
                if want:
                    f = self._tar.extractfile(member)
                    files[_split_name(member.name)[1]] = f.read()
                member = self._member()
        except (tarfile.TarError, EOFError, OSError) as exc:
            self._fail(f"tar read error ({exc})")
            return None
        self._next_member = member
        self._last_key = key
        if self._position + 1 == self.num_samples and member is None:
            # The last sample may look complete while the end-of-archive blocks are cut off:
            # the writer is atomic, so a missing marker means the file was damaged afterwards
            # and the last sample is not trusted either.
            if os.path.getsize(self.path) < self._tar.offset + _END_OF_ARCHIVE:
                self._fail("the end-of-archive marker is missing")
                return None
        self._position += 1
        return key, files

    def read(self, positions: list[int]) -> Iterator[tuple[int, str | None, ReadResult]]:
        """Yield (position, key, files or error) for each wanted position, in order.

        Args:
            positions: increasing sample positions in [0, num_samples).

        Yields:
            key is None and the result a TokenShardError for a position the shard cannot
            deliver (it is truncated or damaged before that sample). A damaged shard's error
            is yielded for every remaining wanted position, so each lost sample is counted.
        """
        if not positions:
            return
        # Reopen to go backwards (a resume) or on first use; a shard already found damaged
        # stays damaged for later positions, exactly as a fresh read would find it.
        if positions[0] < self._position or (self._tar is None and self._failure is None):
            self._open()
        for pos in positions:
            if not 0 <= pos < self.num_samples:
                raise IndexError(f"position {pos} outside shard {self.name} of {self.num_samples} samples")
            while self._failure is None and self._position < pos:
                self._group(want=False)
            if self._failure is not None:
                yield pos, None, self._failure
                continue
            got = self._group(want=True)
            if got is None:
                yield pos, None, self._failure
            else:
                yield pos, got[0], got[1]
