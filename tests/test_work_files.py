"""The local engine's work files: what it keeps between its two passes must not grow its memory."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from cptkit.engines.work_files import ResultSpill
from cptkit.records import DocResult


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS from /proc")
def test_reading_the_spill_back_does_not_hold_the_file_in_memory(tmp_path: Path) -> None:
    # Random token ids barely compress, so the spill is about as large as the tokens: 96 MB. Read back
    # through a memory map, every page read stays resident until the end of the pass (RSS grew by the
    # file's size); read into buffers, only the batch at hand is.
    rng = np.random.default_rng(0)
    spill = ResultSpill(tmp_path / "results.arrow")
    batches, docs, tokens = 96, 128, 2048
    for b in range(batches):
        ids = pa.record_batch([pa.array([f"doc-{b}-{i}" for i in range(docs)])], names=["id"])
        results = [
            DocResult("keep", None, "text", tokens=rng.integers(0, 50_000, tokens, dtype=np.int32)) for _ in range(docs)
        ]
        spill.write(ids, results)
    spill.close()
    size = spill.path.stat().st_size
    assert size > 80_000_000

    before = _rss_bytes()
    peak, seen = before, 0
    for batch, results in spill.read():
        assert [r.tokens is not None and len(r.tokens) for r in results] == [tokens] * docs
        seen += batch.num_rows
        peak = max(peak, _rss_bytes())
    assert seen == batches * docs
    assert peak - before < size / 4, f"RSS grew by {(peak - before) / 1e6:.0f} MB reading a {size / 1e6:.0f} MB spill"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS from /proc")
def test_a_document_kept_from_each_batch_does_not_keep_its_batch(tmp_path: Path) -> None:
    # The prepared-files writer holds documents until it has a batch of their split; val documents (a
    # few per batch) are held across many batches. Each held document must cost its own tokens only.
    rng = np.random.default_rng(1)
    spill = ResultSpill(tmp_path / "results.arrow")
    batches, docs, tokens = 96, 128, 2048  # 1 MB of tokens a batch
    for b in range(batches):
        ids = pa.record_batch([pa.array([f"doc-{b}-{i}" for i in range(docs)])], names=["id"])
        results = [
            DocResult("keep", None, "text", tokens=rng.integers(0, 50_000, tokens, dtype=np.int32)) for _ in range(docs)
        ]
        spill.write(ids, results)
    spill.close()

    held = []
    before = _rss_bytes()
    for _, results in spill.read():
        held.append(results[0])  # like one val document per batch
    grown = _rss_bytes() - before
    assert len(held) == batches
    assert grown < 24_000_000, f"holding {batches} documents grew RSS by {grown / 1e6:.0f} MB"
