"""Training sequences: documents packed into fixed-length blocks, with replay blocks mixed in at a ratio.

Each document is followed by a separator (end-of-text) token and the stream is cut every
`seq_len` tokens, so almost no position is padding. Replay text is packed the same way in its own
stream and its blocks are spread evenly among the domain blocks. Position ids restart at every document start and
at every block start; with no attention mask, transformers' SDPA path then keeps attention inside each
document. The first token of each document gets no label: predicting it from the previous document
would teach the model a transition that does not exist.

Everything here is a pure function of (documents, ratio, seed, epoch), so a resumed run rebuilds the
exact same stream and continues at the same block.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

# Between packed documents; also the prefix evaluation scores a document's first token after.
SEPARATOR_TOKEN = "<|endoftext|>"

IGNORE = -100


class PackedRow(NamedTuple):
    """One training block as the model takes it, with its token counts."""

    input_ids: np.ndarray
    position_ids: np.ndarray
    labels: np.ndarray
    real_tokens: int  # not padding
    replay_tokens: int  # real tokens from replay documents


@dataclass(frozen=True)
class TokenDocs:
    """Documents as one flat token array and offsets (the Arrow list layout)."""

    values: np.ndarray  # int32 tokens of all documents
    offsets: np.ndarray  # int64, len(docs) + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def total_tokens(self) -> int:
        return int(self.offsets[-1] - self.offsets[0])

    def doc(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    @staticmethod
    def from_lists(docs: list[list[int]]) -> TokenDocs:
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum([len(d) for d in docs], out=offsets[1:])
        values = np.asarray([t for d in docs for t in d], dtype=np.int32)
        return TokenDocs(values, offsets)


@dataclass(frozen=True)
class EpochPlan:
    """The documents of one epoch in training order: every domain document once, and the replay
    documents that fill `replay_blocks` blocks."""

    domain_order: np.ndarray
    replay_order: np.ndarray
    replay_blocks: int


def plan_epoch(
    domain: TokenDocs, replay: TokenDocs | None, replay_ratio: float, seed: int, epoch: int, seq_len: int
) -> EpochPlan:
    """Shuffle the domain documents for this epoch and pick enough replay documents (fresh permutations
    of the replay set, repeated only when it is too small) for replay to make up `replay_ratio` of the
    epoch's blocks."""
    domain_order = np.random.default_rng([seed, epoch, 0]).permutation(len(domain))
    empty = np.zeros(0, dtype=np.int64)
    if replay is None or replay_ratio <= 0 or len(replay) == 0:
        return EpochPlan(domain_order, empty, 0)
    domain_blocks = -(-(domain.total_tokens + len(domain)) // seq_len)  # + one separator per document
    replay_blocks = round(domain_blocks * replay_ratio / (1 - replay_ratio))
    needed = replay_blocks * seq_len
    lengths = replay.lengths + 1
    orders, taken, round_ = [], 0, 0
    while taken < needed:
        order = np.random.default_rng([seed, epoch, 1, round_]).permutation(len(replay))
        cum = np.cumsum(lengths[order])
        cut = int(np.searchsorted(cum, needed - taken)) + 1  # the documents that reach `needed`
        orders.append(order[:cut])
        taken += int(cum[min(cut, len(cum)) - 1])
        round_ += 1
    return EpochPlan(domain_order, np.concatenate(orders) if orders else empty, replay_blocks)


@dataclass(frozen=True)
class _Stream:
    """Documents in an order, each followed by the separator, as one token stream that is never built:
    a window of it is cut from the documents when asked for. It holds 8 bytes per document, so an epoch
    costs memory in proportion to its documents, not to its tokens (which may be memory-mapped)."""

    docs: TokenDocs
    order: np.ndarray
    ends: np.ndarray  # int64: the stream's length after each document and its separator

    @staticmethod
    def of(docs: TokenDocs, order: np.ndarray) -> _Stream:
        return _Stream(docs, order, np.cumsum(docs.lengths[order] + 1, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def window(self, start: int, stop: int, separator: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens start..stop-1 of the stream (stop <= len) and the mask of document starts among them."""
        k = int(np.searchsorted(self.ends, start, side="right"))  # the first document ending after start
        first = begin = int(self.ends[k - 1]) if k else 0
        pieces: list[np.ndarray] = []
        starts = np.zeros(stop - start, dtype=bool)
        sep = np.asarray([separator], dtype=np.int32)
        while begin < stop:
            if begin >= start:
                starts[begin - start] = True
            pieces += [np.asarray(self.docs.doc(int(self.order[k])), dtype=np.int32), sep]
            begin = int(self.ends[k])
            k += 1
        return np.concatenate(pieces)[start - first : stop - first], starts


class Blocks:
    """Packed training sequences of one epoch: the domain stream cut every `seq_len` tokens (its last block
    padded with separators) and, spread evenly among them, the replay stream's blocks. A block is cut from
    the documents when asked for (see `_Stream`)."""

    def __init__(self, domain: _Stream, replay: _Stream | None, replay_blocks: int, separator: int, seq_len: int):
        self.domain, self.replay, self.separator, self.seq_len = domain, replay, separator, seq_len
        n_domain = -(-len(domain) // seq_len)
        n_replay = replay_blocks if replay is not None else 0
        total = n_domain + n_replay
        j = np.arange(total)
        # Block j is a replay block where the running share of replay blocks steps up: evenly spread.
        self.is_replay = (j + 1) * n_replay // total > j * n_replay // total if total else np.zeros(0, bool)
        self.row = np.empty(total, dtype=np.int64)  # the block's row in its own stream
        self.row[self.is_replay] = np.arange(n_replay)
        self.row[~self.is_replay] = np.arange(n_domain)
        self.real_tokens = len(domain) + n_replay * seq_len

    def __len__(self) -> int:
        return len(self.row)

    def window(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens int32, document-start mask, real-token mask) of block i."""
        start = int(self.row[i]) * self.seq_len
        if self.is_replay[i]:
            assert self.replay is not None
            tokens, starts = self.replay.window(start, start + self.seq_len, self.separator)
            return tokens, starts, np.ones(self.seq_len, bool)
        stop = min(start + self.seq_len, len(self.domain))
        tokens, starts = self.domain.window(start, stop, self.separator)
        padding = self.seq_len - len(tokens)
        if padding:
            tokens = np.concatenate([tokens, np.full(padding, self.separator, np.int32)])
            starts = np.concatenate([starts, np.zeros(padding, bool)])
        return tokens, starts, np.arange(self.seq_len) < self.seq_len - padding

    def block(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, position_ids, labels) of block i."""
        tokens, doc_start, real = self.window(i)
        starts = doc_start.copy()
        starts[0] = True  # a block boundary also restarts positions
        idx = np.arange(self.seq_len)
        last_start = np.maximum.accumulate(np.where(starts, idx, 0))
        positions = (idx - last_start).astype(np.int64)
        labels = tokens.astype(np.int64)
        labels[doc_start | ~real] = IGNORE
        return tokens.astype(np.int64), positions, labels

    @property
    def replay_share(self) -> float:
        """Share of real tokens that come from replay documents."""
        return int(self.is_replay.sum()) * self.seq_len / max(self.real_tokens, 1)

    @property
    def efficiency(self) -> float:
        """Share of positions that hold real tokens (not padding)."""
        return self.real_tokens / max(len(self) * self.seq_len, 1)


def pack(plan: EpochPlan, domain: TokenDocs, replay: TokenDocs | None, separator: int, seq_len: int) -> Blocks:
    """The epoch's blocks. Domain and replay documents are packed into blocks separately and the replay
    blocks are spread evenly among the domain blocks, so that any stretch of training (a short run, the
    first steps) sees the configured share, however long the replay documents are. The last domain
    block is padded with separators; the replay stream is cut at its last full block."""
    replay_stream = _Stream.of(replay, plan.replay_order) if replay is not None and plan.replay_blocks else None
    return Blocks(_Stream.of(domain, plan.domain_order), replay_stream, plan.replay_blocks, separator, seq_len)


def sequence_blocks(docs: TokenDocs, separator: int, seq_len: int) -> Blocks:
    """Evaluation blocks: the documents in their stored order, packed the same way."""
    plan = EpochPlan(np.arange(len(docs)), np.zeros(0, dtype=np.int64), 0)
    return pack(plan, docs, None, separator, seq_len)


class BlockStream:
    """The training stream across epochs: global block number -> (epoch, block). Epochs are built
    lazily, one at a time, from (seed, epoch)."""

    def __init__(
        self,
        domain: TokenDocs,
        replay: TokenDocs | None,
        replay_ratio: float,
        seed: int,
        separator: int,
        seq_len: int,
    ) -> None:
        self.domain, self.replay = domain, replay
        self.replay_ratio, self.seed = replay_ratio, seed
        self.separator, self.seq_len = separator, seq_len
        self._epoch = -1
        self._blocks: Blocks | None = None
        self._first = 0  # global index of the current epoch's first block
        self.plan: EpochPlan | None = None

    def epoch_blocks(self, epoch: int) -> Blocks:
        plan = plan_epoch(self.domain, self.replay, self.replay_ratio, self.seed, epoch, self.seq_len)
        return pack(plan, self.domain, self.replay, self.separator, self.seq_len)

    def blocks_per_epoch(self) -> int:
        return len(self.epoch_blocks(0))

    def get(self, index: int) -> tuple[int, Blocks, int]:
        """(epoch, that epoch's blocks, block within it) for a global block index."""
        if self._blocks is None or index < self._first:
            self._epoch, self._first = 0, 0
            self._blocks = self._build(0)
        while index >= self._first + len(self._blocks):
            self._first += len(self._blocks)
            self._epoch += 1
            self._blocks = self._build(self._epoch)
        return self._epoch, self._blocks, index - self._first

    def _build(self, epoch: int) -> Blocks:
        self.plan = plan_epoch(self.domain, self.replay, self.replay_ratio, self.seed, epoch, self.seq_len)
        return pack(self.plan, self.domain, self.replay, self.separator, self.seq_len)

    def batch(self, start: int, count: int) -> Iterator[PackedRow]:
        """Blocks start..start+count-1."""
        for g in range(start, start + count):
            _, blocks, i = self.get(g)
            ids, pos, labels = blocks.block(i)
            real = int(blocks.window(i)[2].sum())
            yield PackedRow(ids, pos, labels, real, real if blocks.is_replay[i] else 0)
