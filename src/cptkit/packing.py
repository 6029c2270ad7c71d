"""Training sequences: documents mixed with replay text at a token ratio, packed into fixed-length blocks.

Each document is followed by a separator (end-of-text) token and the stream is cut every
`seq_len` tokens, so almost no position is padding. Position ids restart at every document start and
at every block start; with no attention mask, transformers' SDPA path then keeps attention inside each
document. The first token of each document gets no label: predicting it from the previous document
would teach the model a transition that does not exist.

Everything here is a pure function of (documents, ratio, seed, epoch), so a resumed run rebuilds the
exact same stream and continues at the same block.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

IGNORE = -100


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
    """The documents of one epoch in training order: (is_replay, index) pairs."""

    order: list[tuple[bool, int]]
    domain_tokens: int
    replay_tokens: int

    @property
    def replay_share(self) -> float:
        total = self.domain_tokens + self.replay_tokens
        return self.replay_tokens / total if total else 0.0


def plan_epoch(domain: TokenDocs, replay: TokenDocs | None, replay_ratio: float, seed: int, epoch: int) -> EpochPlan:
    """Shuffle the domain documents for this epoch and interleave replay documents so that replay makes
    up `replay_ratio` of the epoch's tokens (to within one document)."""
    rng = np.random.default_rng([seed, epoch, 0])
    domain_order = rng.permutation(len(domain))
    if replay is None or replay_ratio <= 0 or len(replay) == 0:
        return EpochPlan([(False, int(i)) for i in domain_order], domain.total_tokens, 0)

    dlen, rlen = domain.lengths + 1, replay.lengths + 1  # + separator
    target_replay = dlen.sum() * replay_ratio / (1 - replay_ratio)
    # Replay documents come from fresh permutations of the replay set, repeated only when needed.
    replay_stream: list[int] = []
    taken = 0.0
    round_ = 0
    while taken < target_replay:
        for i in np.random.default_rng([seed, epoch, 1, round_]).permutation(len(replay)):
            if taken >= target_replay:
                break
            replay_stream.append(int(i))
            taken += rlen[i]
        round_ += 1

    order: list[tuple[bool, int]] = []
    d_tok = r_tok = 0
    ratio = replay_ratio / (1 - replay_ratio)
    di = ri = 0
    while di < len(domain_order) or ri < len(replay_stream):
        take_replay = ri < len(replay_stream) and (di >= len(domain_order) or r_tok < ratio * d_tok)
        if take_replay:
            idx = replay_stream[ri]
            order.append((True, idx))
            r_tok += int(rlen[idx])
            ri += 1
        else:
            idx = int(domain_order[di])
            order.append((False, idx))
            d_tok += int(dlen[idx])
            di += 1
    return EpochPlan(order, d_tok, r_tok)


@dataclass(frozen=True)
class Blocks:
    """Packed training sequences of one epoch, built from a flat token stream."""

    tokens: np.ndarray  # int32, the epoch's stream padded to a multiple of seq_len
    doc_start: np.ndarray  # bool, True at each document's first token
    real: np.ndarray  # bool, False on padding
    replay: np.ndarray  # bool, True on replay tokens
    seq_len: int

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def block(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input_ids, position_ids, labels) of block i."""
        sl = slice(i * self.seq_len, (i + 1) * self.seq_len)
        tokens, starts, real = self.tokens[sl], self.doc_start[sl].copy(), self.real[sl]
        starts[0] = True  # a block boundary also restarts positions
        idx = np.arange(self.seq_len)
        last_start = np.maximum.accumulate(np.where(starts, idx, 0))
        positions = (idx - last_start).astype(np.int64)
        labels = tokens.astype(np.int64)
        labels[self.doc_start[sl] | ~real] = IGNORE
        return tokens.astype(np.int64), positions, labels

    @property
    def real_tokens(self) -> int:
        return int(self.real.sum())

    @property
    def replay_share(self) -> float:
        """Share of real tokens that come from replay documents."""
        return int((self.replay & self.real).sum()) / max(self.real_tokens, 1)

    @property
    def efficiency(self) -> float:
        """Share of positions that hold real tokens (not padding)."""
        return self.real_tokens / max(len(self.tokens), 1)


def pack(
    plan: EpochPlan, domain: TokenDocs, replay: TokenDocs | None, separator: int, seq_len: int, pad: int
) -> Blocks:
    pieces: list[np.ndarray] = []
    is_replay: list[np.ndarray] = []
    sep = np.asarray([separator], dtype=np.int32)
    for from_replay, idx in plan.order:
        docs = replay if from_replay and replay is not None else domain
        doc = docs.doc(idx)
        pieces.append(doc)
        pieces.append(sep)
        is_replay.append(np.full(len(doc) + 1, from_replay))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    replay_mask = np.concatenate(is_replay) if is_replay else np.zeros(0, bool)
    starts = np.zeros(len(stream), dtype=bool)
    lengths = np.asarray([len(p) for p in pieces[0::2]], dtype=np.int64) + 1
    if len(lengths):
        starts[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True
    padding = (-len(stream)) % seq_len
    real = np.concatenate([np.ones(len(stream), bool), np.zeros(padding, bool)])
    stream = np.concatenate([stream, np.full(padding, pad, np.int32)])
    starts = np.concatenate([starts, np.zeros(padding, bool)])
    replay_mask = np.concatenate([replay_mask, np.zeros(padding, bool)])
    return Blocks(stream, starts, real, replay_mask, seq_len)


def sequence_blocks(docs: TokenDocs, separator: int, seq_len: int) -> Blocks:
    """Evaluation blocks: the documents in their stored order, packed the same way."""
    plan = EpochPlan([(False, i) for i in range(len(docs))], docs.total_tokens, 0)
    return pack(plan, docs, None, separator, seq_len, separator)


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
        plan = plan_epoch(self.domain, self.replay, self.replay_ratio, self.seed, epoch)
        return pack(plan, self.domain, self.replay, self.separator, self.seq_len, self.separator)

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
        self.plan = plan_epoch(self.domain, self.replay, self.replay_ratio, self.seed, epoch)
        return pack(self.plan, self.domain, self.replay, self.separator, self.seq_len, self.separator)

    def batch(self, start: int, count: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int, int]]:
        """Blocks start..start+count-1 as (input_ids, position_ids, labels, real, replay tokens)."""
        for g in range(start, start + count):
            _, blocks, i = self.get(g)
            ids, pos, labels = blocks.block(i)
            sl = slice(i * self.seq_len, (i + 1) * self.seq_len)
            yield ids, pos, labels, int(blocks.real[sl].sum()), int((blocks.replay[sl] & blocks.real[sl]).sum())
