import numpy as np
import pytest

from rtloop.errors import InputError
from rtloop.runtime.chunks import MERGE_RULES, ChunkBuffer


def chunk(value: float, h: int = 4) -> np.ndarray:
    """[h, 7]: row i is value + i, so every action says which chunk and position it came from."""
    return value + np.arange(h, dtype=np.float64)[:, None] * np.ones((1, 7))


def test_a_chunk_executes_in_order_one_action_per_step():
    buf = ChunkBuffer()
    buf.add(chunk(10), seq=1, start=0)
    got = [buf.pop(step) for step in range(5)]
    assert [a.action[0] for a in got[:4]] == [10, 11, 12, 13]
    assert [(a.seq, a.index, a.step) for a in got[:4]] == [(1, 0, 0), (1, 1, 1), (1, 2, 2), (1, 3, 3)]
    assert got[4] is None  # nothing left: the runtime holds its last action


def test_needs_request_follows_the_unexecuted_fraction():
    buf = ChunkBuffer()
    assert buf.needs_request(0.5)  # empty
    buf.add(chunk(0, h=10), seq=1, start=0)
    asked = []
    for step in range(10):
        buf.pop(step)
        asked.append(buf.needs_request(0.5))
    # 9/10 .. 6/10 left: no; 5/10 and below: yes
    assert asked == [False, False, False, False, True, True, True, True, True, True]
    assert ChunkBuffer().needs_request(0.0)  # empty: asks even at threshold 0
    with pytest.raises(InputError, match="0..1"):
        buf.needs_request(1.5)


def test_latest_only_replaces_the_overlap_and_drops_the_past():
    buf = ChunkBuffer("latest_only")
    buf.add(chunk(10), seq=1, start=0)  # steps 0..3
    assert buf.pop(0).action[0] == 10
    assert buf.pop(1).action[0] == 11
    # inference 2 saw the observation of step 1 and arrives when step 2 is next: its action for step 1 is past
    buf.add(chunk(20), seq=2, start=1, now=2)  # steps 1..4
    a2, a3, a4 = buf.pop(2), buf.pop(3), buf.pop(4)
    assert [a.action[0] for a in (a2, a3, a4)] == [21, 22, 23]
    assert [(a.seq, a.index, a.merged) for a in (a2, a3, a4)] == [(2, 1, True), (2, 2, True), (2, 3, False)]
    assert buf.dropped == 1


def test_weighted_average_blends_old_and_new_as_lerobot_does():
    buf = ChunkBuffer("weighted_average")
    buf.add(chunk(10), seq=1, start=0)  # steps 0..3
    buf.add(chunk(20), seq=2, start=2)  # steps 2..5; overlap at 2 and 3
    actions = [buf.pop(s).action[0] for s in range(6)]
    assert actions == pytest.approx([10, 11, 0.3 * 12 + 0.7 * 20, 0.3 * 13 + 0.7 * 21, 22, 23])


def test_steps_skipped_by_the_caller_are_dropped_unexecuted():
    buf = ChunkBuffer()
    buf.add(chunk(10), seq=1, start=0)
    assert buf.pop(2).action[0] == 12  # steps 0 and 1 were never asked for
    assert buf.dropped == 2 and len(buf) == 1


def test_a_chunk_entirely_in_the_past_adds_nothing():
    buf = ChunkBuffer()
    buf.add(chunk(10), seq=1, start=0, now=9)
    assert len(buf) == 0 and buf.dropped == 4


def test_rules_are_chosen_by_name():
    assert {"latest_only", "weighted_average"} <= set(MERGE_RULES)
    with pytest.raises(InputError, match="valid: latest_only, weighted_average"):
        ChunkBuffer("newest")
    with pytest.raises(InputError, match=r"\[H, action_dim\]"):
        ChunkBuffer().add(np.zeros(7), seq=1, start=0)
