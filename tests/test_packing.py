"""Packing, replay mixing and learning-rate schedules: pure functions, checked on small inputs."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from cptkit.config import TrainingConfig
from cptkit.packing import IGNORE, Blocks, BlockStream, TokenDocs, pack, plan_epoch, sequence_blocks
from cptkit.schedule import lr_factor


def docs(*lengths: int, start: int = 10) -> TokenDocs:
    out, tok = [], start
    for n in lengths:
        out.append(list(range(tok, tok + n)))
        tok += n
    return TokenDocs.from_lists(out)


def epoch_arrays(blocks: Blocks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, replay mask, real mask) of all the epoch's blocks, one after another."""
    windows = [blocks.window(i) for i in range(len(blocks))]
    tokens = np.concatenate([w[0] for w in windows])
    real = np.concatenate([w[2] for w in windows])
    return tokens, np.repeat(blocks.is_replay, blocks.seq_len), real


def eager_blocks(domain: list[list[int]], order: list[int], separator: int, seq_len: int) -> list[list[int]]:
    """The reference: the whole stream built, padded, then cut."""
    stream = [t for i in order for t in [*domain[i], separator]]
    stream += [separator] * (-len(stream) % seq_len)
    return [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]


@pytest.mark.parametrize("seq_len", [3, 8, 50])
def test_blocks_cut_from_the_documents_equal_the_whole_stream_cut(seq_len: int) -> None:
    rng = np.random.default_rng(seq_len)
    lists = [rng.integers(2, 99, int(n)).tolist() for n in rng.integers(0, 40, size=30)]
    d = TokenDocs.from_lists(lists)
    plan = plan_epoch(d, None, 0.0, seed=5, epoch=0, seq_len=seq_len)
    blocks = pack(plan, d, None, separator=1, seq_len=seq_len)
    expected = eager_blocks(lists, plan.domain_order.tolist(), 1, seq_len)
    assert [blocks.window(i)[0].tolist() for i in range(len(blocks))] == expected


def test_pack_restarts_positions_per_document_and_masks_first_tokens() -> None:
    d = docs(3, 2, 4)
    blocks = sequence_blocks(d, separator=1, seq_len=8)
    # stream: 10 11 12 1 | 13 14 1 | 15 16 17 18 1  (12 tokens) + 4 padding -> 2 blocks
    assert len(blocks) == 2 and blocks.real_tokens == 12 and blocks.efficiency == 12 / 16
    ids, pos, labels = blocks.block(0)
    assert ids.tolist() == [10, 11, 12, 1, 13, 14, 1, 15]
    assert pos.tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert labels.tolist() == [IGNORE, 11, 12, 1, IGNORE, 14, 1, IGNORE]
    ids, pos, labels = blocks.block(1)
    # The last document continues into block 1, whose positions restart; padding is unlabelled.
    assert ids.tolist() == [16, 17, 18, 1, 1, 1, 1, 1]
    assert pos.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert labels.tolist() == [16, 17, 18, 1, IGNORE, IGNORE, IGNORE, IGNORE]


def test_plan_without_replay_is_a_seeded_permutation() -> None:
    d = docs(*([5] * 20))
    a = plan_epoch(d, None, 0.0, seed=3, epoch=0, seq_len=16)
    assert sorted(a.domain_order.tolist()) == list(range(20))
    assert a.domain_order.tolist() == plan_epoch(d, None, 0.0, seed=3, epoch=0, seq_len=16).domain_order.tolist()
    assert a.domain_order.tolist() != plan_epoch(d, None, 0.0, seed=3, epoch=1, seq_len=16).domain_order.tolist()
    assert a.domain_order.tolist() != plan_epoch(d, None, 0.0, seed=4, epoch=0, seq_len=16).domain_order.tolist()
    assert a.replay_blocks == 0 and len(a.replay_order) == 0


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.5])
def test_replay_share_of_tokens_matches_the_ratio(ratio: float) -> None:
    rng = np.random.default_rng(0)
    domain = docs(*rng.integers(50, 400, size=200).tolist())
    replay = docs(*rng.integers(50, 400, size=150).tolist(), start=5000)
    plan = plan_epoch(domain, replay, ratio, seed=1, epoch=0, seq_len=256)
    blocks = pack(plan, domain, replay, separator=1, seq_len=256)
    assert blocks.replay_share == pytest.approx(ratio, abs=0.01)
    # Every domain token is trained on exactly once per epoch.
    tokens, replay_mask, real = epoch_arrays(blocks)
    domain_tokens = tokens[~replay_mask & real]
    assert sorted(t for t in domain_tokens.tolist() if t != 1) == sorted(domain.values.tolist())
    # Interleaved, not appended: the replay share of each quarter of the epoch is near the ratio too.
    quarter = len(tokens) // 4
    for q in range(4):
        sl = slice(q * quarter, (q + 1) * quarter)
        assert replay_mask[sl].mean() == pytest.approx(ratio, abs=0.02)


def test_long_replay_documents_do_not_bunch_up() -> None:
    """Replay articles many blocks long (Wikipedia) must not fill the first steps of a run: every
    stretch of ten blocks holds the configured share, to within a block."""
    domain = docs(*([300] * 100))
    replay = docs(*([5000] * 10), start=90_000)
    plan = plan_epoch(domain, replay, 0.2, seed=0, epoch=0, seq_len=256)
    blocks = pack(plan, domain, replay, separator=1, seq_len=256)
    per_block = blocks.is_replay
    for start in range(0, len(per_block) - 10, 10):
        assert 1 <= per_block[start : start + 10].sum() <= 3


def test_replay_repeats_only_when_the_replay_set_is_too_small() -> None:
    domain = docs(*([100] * 50))
    small = docs(*([100] * 3), start=9000)
    plan = plan_epoch(domain, small, 0.5, seed=0, epoch=0, seq_len=64)
    blocks = pack(plan, domain, small, separator=1, seq_len=64)
    assert blocks.replay_share == pytest.approx(0.5, abs=0.01)
    # 79 domain blocks call for 79 replay blocks: 51 documents of 101 tokens (with the separator).
    assert plan.replay_blocks == 79 and len(plan.replay_order) == 51
    big = docs(*([100] * 80), start=9000)
    plan = plan_epoch(domain, big, 0.5, seed=0, epoch=0, seq_len=64)
    assert len(set(plan.replay_order.tolist())) == len(plan.replay_order)  # no repeats when not needed


def test_block_stream_crosses_epochs_deterministically() -> None:
    domain = docs(*([30] * 10))
    stream = BlockStream(domain, None, 0.0, seed=0, separator=1, seq_len=16)
    per_epoch = stream.blocks_per_epoch()
    first = [b[0].tolist() for b in stream.batch(0, per_epoch + 3)]
    again = BlockStream(domain, None, 0.0, seed=0, separator=1, seq_len=16)
    # Random access (as after a resume) gives the same blocks as reading from the start.
    assert [b[0].tolist() for b in again.batch(per_epoch - 1, 4)] == first[per_epoch - 1 :]
    assert first[:per_epoch] != first[per_epoch : 2 * per_epoch]  # the next epoch is reshuffled


def _cfg(**kw: object) -> TrainingConfig:
    return TrainingConfig.model_validate(kw)


def test_cosine_schedule_shape() -> None:
    c = _cfg(lr_scheduler="cosine", warmup_steps=10, min_lr_ratio=0.1)
    f = [lr_factor(s, 100, c) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in pairwise(f[:10]))
    assert f[10] == pytest.approx(1.0) and f[99] == pytest.approx(0.1)
    assert f[int(10 + 89 / 2)] == pytest.approx(0.55, abs=0.02)
    assert all(a >= b for a, b in pairwise(f[10:]))


def test_wsd_schedule_shape() -> None:
    c = _cfg(lr_scheduler="wsd", warmup_ratio=0.1, decay_ratio=0.2, min_lr_ratio=0.0)
    f = [lr_factor(s, 100, c) for s in range(100)]
    assert f[9] == pytest.approx(1.0)
    assert all(x == 1.0 for x in f[10:80])
    assert f[80] < 1.0 and f[99] == pytest.approx(0.0)
    assert all(a > b for a, b in pairwise(f[80:]))


def test_constant_schedule_and_ratio_warmup() -> None:
    c = _cfg(lr_scheduler="constant", warmup_ratio=0.05)
    f = [lr_factor(s, 200, c) for s in range(200)]
    assert f[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert all(x == 1.0 for x in f[10:])
