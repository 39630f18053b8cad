"""The pinned host memory that offloaded tensors live in: one arena per offloader, reused across steps and lengths.

Note [Host arena]
~~~~~~~~~~~~~~~~~
Offloaded checkpoints and kept attention outputs used to take pinned memory from CUDA's caching host allocator, one
block per tensor. That allocator keeps freed blocks for later requests of their size, so a process whose lengths
change keeps the blocks of every length it ran: one that ran 64K, then 128K, then 256K tokens (8B shape, one H200)
held 98.7 GiB for 64 GiB of live data at 128K, and the host's OOM killer ended it at 256K (issue 13).

So each offloader owns an arena instead: chunks of pinned memory cut into pages. A host copy takes any free pages —
one contiguous run where there is one, several runs where not (a copy then moves run by run) — so every free page
serves any later tensor, whatever lengths came before:

    chunk 0  [ x₀ x₀ x₀ | o₀ o₀ o₀ | x₁ x₁ x₁ | .. .. ]     x: checkpoints, o: attention outputs, ..: free pages
    chunk 1  [ o₁ o₁ o₁ | x₂ x₂ .. | .. .. .. | .. .. ]     a longer x₃ takes the free pages of both chunks

The arena grows by a chunk when its free pages do not suffice, never beyond its limit (the host budget, Note [Host
budget]); a request past it is refused and the tensor stays on the GPU. So the pinned footprint is the most that was
ever live, rounded up to a chunk, and at most the budget: repeating, growing and shrinking lengths add nothing to it.
Chunk sizes are powers of two, which the caching host allocator serves without rounding (it rounds every request up
to one: ATen/core/CachingHostAllocator.h). Pages freed while a copy
on the side stream may still use them wait for an event recorded on that stream before they are handed out again.
Without CUDA the chunks are ordinary host memory and nothing waits: the same allocation logic, which is how it is
tested (tests/test_host_arena.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAGE_BYTES = 4096
CHUNK_BYTES = 1 << 30


@dataclass(frozen=True)
class Run:
    """Consecutive pages of one chunk."""

    chunk: int
    start: int  # first page
    pages: int


class HostArena:
    """Pages of host memory (pinned with CUDA) handed out in runs; see Note [Host arena].

    limit: bytes the chunks may take together (None: no limit). chunk_bytes: the size of a new chunk (a power of two),
    smaller near the limit.
    """

    def __init__(self, limit: int | None, *, pinned: bool, chunk_bytes: int = CHUNK_BYTES,
                 page_bytes: int = PAGE_BYTES):
        self.limit, self.pinned, self.chunk_bytes, self.page_bytes = limit, pinned, chunk_bytes, page_bytes
        self.chunks: list[torch.Tensor] = []
        self.free: list[list[tuple[int, int]]] = []  # per chunk: free (start, pages) runs, sorted by start
        self.pending: list[tuple[object, list[Run]]] = []  # runs freed behind a side-stream event
        self.size = self.peak_size = 0

    def pages(self, nbytes: int) -> int:
        return -(-nbytes // self.page_bytes)

    def has_room(self, nbytes: int) -> bool:
        """Whether `nbytes` more could be allocated now (growing the arena within its limit if need be)."""
        need = self.pages(nbytes)
        return need <= self._ready() + self._pending() + self._growable_pages() and self._under_limit(need)

    def _under_limit(self, need: int) -> bool:
        """Whether `need` more pages keep the live pages within the limit, which may have been lowered below the
        arena's size (a shorter batch's host budget: the chunks stay, only what is live is bounded)."""
        if self.limit is None:
            return True
        live = self.size // self.page_bytes - self._ready() - self._pending()
        return (live + need) * self.page_bytes <= self.limit

    def allocate(self, nbytes: int) -> list[Run] | None:
        """Runs of pages holding at least `nbytes`, or None where the limit leaves no room. Pages whose copies are
        still running are waited for before the arena grows."""
        need = self.pages(nbytes)
        if need == 0:  # an empty tensor: nothing to hold (a full arena has no run to cut zero pages from)
            return []
        if not self._under_limit(need):
            return None
        self._reclaim_completed()
        while self._ready() + self._pending() < need:
            if not self._grow():
                return None
        while self._ready() < need:
            event, runs = self.pending.pop(0)
            event.synchronize()
            for run in runs:
                self._insert(run)
        return self._take(need)

    def release(self, runs: list[Run], event=None) -> None:
        """Give runs back; with an event (recorded on the stream that copies them), only once it has completed."""
        if event is not None:
            self.pending.append((event, runs))
            return
        for run in runs:
            self._insert(run)

    def view(self, run: Run) -> torch.Tensor:
        """The bytes of a run (a uint8 view of its chunk)."""
        start = run.start * self.page_bytes
        return self.chunks[run.chunk][start : start + run.pages * self.page_bytes]

    def _ready(self) -> int:
        return sum(n for runs in self.free for _, n in runs)

    def _pending(self) -> int:
        return sum(run.pages for _, runs in self.pending for run in runs)

    def _growable_pages(self) -> int:
        if self.limit is None:
            return 1 << 62
        room, pages = self.limit - self.size, 0
        while (size := self._chunk_size(room)) >= self.page_bytes:
            pages, room = pages + size // self.page_bytes, room - size
        return pages

    def _chunk_size(self, room: int) -> int:
        """The next chunk's bytes: chunk_bytes, or the largest power of two within `room` (0 when under a page)."""
        if room >= self.chunk_bytes:
            return self.chunk_bytes
        return 1 << (room.bit_length() - 1) if room >= self.page_bytes else 0

    def _grow(self) -> bool:
        size = self._chunk_size(self.limit - self.size) if self.limit is not None else self.chunk_bytes
        if size < self.page_bytes:
            return False
        self.chunks.append(torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned))
        self.free.append([(0, size // self.page_bytes)])
        self.size += size
        self.peak_size = max(self.peak_size, self.size)
        return True

    def _reclaim_completed(self) -> None:
        """Return the pending runs whose copies are done."""
        still = []
        for event, runs in self.pending:
            if event.query():
                for run in runs:
                    self._insert(run)
            else:
                still.append((event, runs))
        self.pending = still

    def _take(self, need: int) -> list[Run]:
        """One run of `need` pages where one fits (first fit), else the largest free runs until covered."""
        for chunk, runs in enumerate(self.free):
            for i, (start, pages) in enumerate(runs):
                if pages >= need:
                    runs[i:i + 1] = [(start + need, pages - need)] if pages > need else []
                    return [Run(chunk, start, need)]
        taken = []
        for chunk, start, pages in sorted(((c, s, n) for c, runs in enumerate(self.free) for s, n in runs),
                                          key=lambda r: -r[2]):
            use = min(pages, need)
            self._remove(chunk, start, use)
            taken.append(Run(chunk, start, use))
            need -= use
            if need == 0:
                return taken
        raise AssertionError("HostArena._take: free pages were counted but not found")

    def _remove(self, chunk: int, start: int, pages: int) -> None:
        runs = self.free[chunk]
        i = next(i for i, (s, _) in enumerate(runs) if s == start)
        rest = runs[i][1] - pages
        runs[i:i + 1] = [(start + pages, rest)] if rest else []

    def _insert(self, run: Run) -> None:
        """Put a run back, merged with free neighbours."""
        runs = self.free[run.chunk]
        start, pages = run.start, run.pages
        i = 0
        while i < len(runs) and runs[i][0] < start:
            i += 1
        if i > 0 and runs[i - 1][0] + runs[i - 1][1] == start:
            start, pages = runs[i - 1][0], runs[i - 1][1] + pages
            i -= 1
            del runs[i]
        if i < len(runs) and start + pages == runs[i][0]:
            pages += runs[i][1]
            del runs[i]
        runs.insert(i, (start, pages))
