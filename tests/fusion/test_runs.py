"""Run detection, segment bookkeeping and the exact choice of segments (no torch)."""

from __future__ import annotations

import itertools
import random

import pytest

from puzzle.errors import ConfigError
from puzzle.fusion.runs import (Segment, check_segments, choose_segments, find_runs, fused_blocks, fused_width,
                                is_fusable, parse_segments, segment_score)
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig


def blk(attention: str, ffn: str, width: int = 64) -> BlockConfig:
    a = {"gqa": AttentionConfig.gqa(2), "linear": AttentionConfig.linear(), "no_op": AttentionConfig.no_op()}[attention]
    f = {"swiglu": FFNConfig.swiglu(width), "linear": FFNConfig.linear(), "no_op": FFNConfig.no_op()}[ffn]
    return BlockConfig(attention=a, ffn=f)


F = lambda width=64: blk("no_op", "swiglu", width)  # noqa: E731  a fusable block
G = lambda width=64: blk("gqa", "swiglu", width)  # noqa: E731  a normal transformer block


# ------------------------------------------------------------------------------------------ Segment


def test_segment_basics():
    s = Segment(20, 24)
    assert list(s.layers) == [20, 21, 22, 23] and len(s) == 4 and s.label == "20-23"
    assert Segment(7, 8).label == "7" and len(Segment(7, 8)) == 1
    for start, stop in [(3, 3), (4, 2), (-1, 2)]:
        with pytest.raises(ConfigError):
            Segment(start, stop)


def test_is_fusable_only_for_attention_free_swiglu():
    assert is_fusable(F())
    for b in [G(), blk("linear", "swiglu"), blk("no_op", "linear"), blk("no_op", "no_op"), blk("gqa", "no_op")]:
        assert not is_fusable(b), b.label


# ------------------------------------------------------------------------------------------ find_runs


def test_find_runs_maximal_runs():
    blocks = [G(), F(), F(), F(), G(), F(), F(), G()]
    assert find_runs(blocks) == [Segment(1, 4), Segment(5, 7)]


def test_runs_at_both_ends_and_whole_model():
    assert find_runs([F(), F(), G(), F(), F(), F()]) == [Segment(0, 2), Segment(3, 6)]
    assert find_runs([F()] * 5) == [Segment(0, 5)]
    assert find_runs([G()] * 5) == []


@pytest.mark.parametrize("breaker", [blk("no_op", "linear"), blk("no_op", "no_op"), blk("gqa", "swiglu"),
                                     blk("linear", "swiglu")])
def test_non_fusable_block_breaks_a_run(breaker):
    blocks = [F(), F(), F(), breaker, F(), F()]
    assert find_runs(blocks) == [Segment(0, 3), Segment(4, 6)]
    # a breaker between two singles leaves no run of two
    assert find_runs([G(), F(), breaker, F(), G()]) == []


def test_min_length():
    blocks = [F(), G(), F(), F(), G(), F(), F(), F(), G()]
    assert find_runs(blocks) == [Segment(2, 4), Segment(5, 8)]
    assert find_runs(blocks, min_length=1) == [Segment(0, 1), Segment(2, 4), Segment(5, 8)]
    assert find_runs(blocks, min_length=3) == [Segment(5, 8)]
    assert find_runs(blocks, min_length=4) == []


def test_find_runs_random_against_definition():
    rng = random.Random(1)
    kinds = [F(), G(), blk("no_op", "linear"), blk("no_op", "no_op")]
    for _ in range(200):
        blocks = [rng.choice(kinds) for _ in range(rng.randint(1, 12))]
        m = rng.randint(1, 4)
        runs = find_runs(blocks, min_length=m)
        flags = [is_fusable(b) for b in blocks]
        want = []
        for key, grp in itertools.groupby(enumerate(flags), key=lambda t: t[1]):
            idx = [i for i, _ in grp]
            if key and len(idx) >= m:
                want.append(Segment(idx[0], idx[-1] + 1))
        assert runs == want, (flags, m)


# ------------------------------------------------------------------------------------------ fused_blocks


def test_fused_blocks_new_list_and_origin():
    blocks = [G(96), F(48), F(64), F(32), G(96), F(16), F(16), F(16), G(96)]
    out, origin = fused_blocks(blocks, [Segment(5, 7), Segment(1, 4)])  # order of segments does not matter
    assert origin == [0, 1, 4, 5, 7, 8]
    assert len(out) == 6
    assert out[0] == blocks[0] and out[2] == blocks[4] and out[4] == blocks[7] and out[5] == blocks[8]
    assert out[1] == BlockConfig(attention=AttentionConfig.no_op(), ffn=FFNConfig.swiglu(48 + 64 + 32))
    assert out[3] == BlockConfig(attention=AttentionConfig.no_op(), ffn=FFNConfig.swiglu(32))
    assert fused_width(blocks, Segment(1, 4)) == 144


def test_fused_blocks_single_layer_segment_and_no_segments_change_nothing():
    blocks = [G(), F(48), F(64), G()]
    assert fused_blocks(blocks, []) == (blocks, [0, 1, 2, 3])
    assert fused_blocks(blocks, [Segment(2, 3)]) == (blocks, [0, 1, 2, 3])


def test_fused_blocks_whole_model():
    blocks = [F(8), F(16), F(24)]
    out, origin = fused_blocks(blocks, [Segment(0, 3)])
    assert out == [F(48)] and origin == [0]


# ------------------------------------------------------------------------------------------ check_segments


def test_check_segments_sorts_and_accepts_adjacent():
    blocks = [F()] * 6
    assert check_segments(blocks, [Segment(3, 6), Segment(0, 3)]) == [Segment(0, 3), Segment(3, 6)]


@pytest.mark.parametrize("segments, words", [
    ([Segment(1, 4), Segment(3, 5)], "overlap"),
    ([Segment(1, 3), Segment(1, 3)], "overlap"),
    ([Segment(4, 8)], "past the last layer"),
    ([Segment(0, 2)], "not attention-free"),  # layer 0 has attention
    ([Segment(4, 6)], "not attention-free"),  # layer 5 has a linear FFN
])
def test_check_segments_errors(segments, words):
    blocks = [G(), F(), F(), F(), F(), blk("no_op", "linear"), F()]
    with pytest.raises(ConfigError, match=words):
        check_segments(blocks, segments)
    with pytest.raises(ConfigError):
        fused_blocks(blocks, segments)


def test_check_segments_names_bad_layers():
    blocks = [G(), F(), blk("no_op", "no_op"), F()]
    with pytest.raises(ConfigError) as err:
        check_segments(blocks, [Segment(0, 4)])
    msg = str(err.value)
    assert "0 (gqa:2|swiglu:64)" in msg and "2 (no_op|no_op)" in msg and "1 (" not in msg


# ------------------------------------------------------------------------------------------ parse_segments


def test_parse_segments():
    assert parse_segments("20-23,25") == [Segment(20, 24), Segment(25, 26)]
    assert parse_segments(" 1-2 , 4-4 ,") == [Segment(1, 3), Segment(4, 5)]
    assert parse_segments("0") == [Segment(0, 1)]
    assert [s.label for s in parse_segments("20-23,25")] == ["20-23", "25"]  # labels round-trip


@pytest.mark.parametrize("text", ["", " , ", "a-b", "3-x", "1-2-3", "-2", "1.5-3", "twenty"])
def test_parse_segments_bad_text(text):
    with pytest.raises(ConfigError, match="20-23,25-27"):  # the message shows how to write ranges
        parse_segments(text)


def test_parse_segments_reversed_range():
    with pytest.raises(ConfigError, match="ends before it starts"):
        parse_segments("1-2,5-3")


# ------------------------------------------------------------------------------------------ choose_segments


def test_segment_score_is_mean_of_pairs():
    d = [[0, 0.1, 0.2, 0.3], [0, 0, 0.4, 0.5], [0, 0, 0, 0.6], [0, 0, 0, 0]]
    assert segment_score(d, 0, 1) == 0.0
    assert segment_score(d, 0, 2) == pytest.approx(0.1)
    assert segment_score(d, 1, 4) == pytest.approx((0.4 + 0.5 + 0.6) / 3)
    assert segment_score(d, 0, 4) == pytest.approx(2.1 / 6)


def _all_splits(n: int):
    """Every way to cut range(n) into consecutive pieces: lists of (a, b)."""
    for mask in range(2 ** (n - 1)):
        cuts = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        yield list(zip(cuts, cuts[1:]))


def _brute_force(d, widths, threshold, max_width):
    best = None
    for split in _all_splits(len(widths)):
        ok = all(b - a == 1 or (segment_score(d, a, b) <= threshold
                                and (max_width is None or sum(widths[a:b]) <= max_width)) for a, b in split)
        if not ok:
            continue
        score = 0.0
        for a, b in split:
            score += segment_score(d, a, b)
        key = (len(split), score)
        if best is None or key < best:
            best = key
    return best


def _cover(run: Segment, chosen: list[Segment]) -> list[tuple[int, int]]:
    """The full partition (relative to the run) implied by the returned segments plus single layers."""
    covered = {i for s in chosen for i in s.layers}
    pieces = [(s.start - run.start, s.stop - run.start) for s in chosen]
    pieces += [(i - run.start, i - run.start + 1) for i in run.layers if i not in covered]
    return sorted(pieces)


def test_choose_segments_matches_brute_force():
    rng = random.Random(0)
    checked_nontrivial = 0
    for trial in range(400):
        n = rng.randint(1, 7)
        start = rng.randint(0, 5)
        run = Segment(start, start + n)
        d = [[(rng.random() * 0.4 if j > i else 0.0) for j in range(n)] for i in range(n)]
        if trial % 5 == 0:  # some exact ties: quantized values
            d = [[round(v, 1) for v in row] for row in d]
        widths = [rng.choice([16, 32, 48, 64]) for _ in range(n)]
        threshold = rng.choice([0.0, 0.05, 0.1, 0.2, 0.3, 0.5, rng.random() * 0.4])
        max_width = rng.choice([None, 64, 96, 128, 200, rng.randint(16, 300)])
        chosen = choose_segments(run, d, widths, threshold=threshold, max_width=max_width)
        # shape of the answer: sorted, disjoint, inside the run, none of length 1, each admissible
        assert all(len(s) >= 2 for s in chosen)
        assert all(run.start <= s.start and s.stop <= run.stop for s in chosen)
        assert all(a.stop <= b.start for a, b in zip(chosen, chosen[1:]))
        for s in chosen:
            a, b = s.start - run.start, s.stop - run.start
            assert segment_score(d, a, b) <= threshold
            assert max_width is None or sum(widths[a:b]) <= max_width
        pieces = _cover(run, chosen)
        assert sum(b - a for a, b in pieces) == n
        count = len(pieces)
        score = 0.0
        for a, b in pieces:
            score += segment_score(d, a, b)
        want_count, want_score = _brute_force(d, widths, threshold, max_width)
        assert count == want_count, (d, widths, threshold, max_width, chosen)
        assert score == pytest.approx(want_score, abs=1e-12), (d, widths, threshold, max_width, chosen)
        checked_nontrivial += bool(chosen)
    assert checked_nontrivial > 50  # the random cases do exercise fusion


def test_choose_segments_known_cases():
    run = Segment(10, 14)
    zero = [[0.0] * 4 for _ in range(4)]
    assert choose_segments(run, zero, [8] * 4, threshold=0.1) == [Segment(10, 14)]
    assert choose_segments(run, zero, [8] * 4, threshold=0.1, max_width=16) == [Segment(10, 12), Segment(12, 14)]
    assert choose_segments(run, zero, [8] * 4, threshold=0.1, max_width=8) == []  # nothing fits: all single
    high = [[(1.0 if j > i else 0.0) for j in range(4)] for i in range(4)]
    assert choose_segments(run, high, [8] * 4, threshold=0.5) == []
    # layers 11 and 12 depend on each other; everything else is independent
    d = [[0.0] * 4 for _ in range(4)]
    d[1][2] = 0.9
    assert choose_segments(run, d, [8] * 4, threshold=0.1) == [Segment(10, 12), Segment(12, 14)]
    # tie on the count (2 segments either way) goes to the lowest total dependency
    d = [[0.0, 0.05, 0.05, 0.05], [0, 0, 0.09, 0.5], [0, 0, 0, 0.01], [0] * 4]
    # all four: mean 0.125 (too high); {10,11,12}+{13}: 0.0633; {10,11}+{12,13}: 0.06; {11,12,13}: 0.2 (too high)
    assert choose_segments(run, d, [8] * 4, threshold=0.1) == [Segment(10, 12), Segment(12, 14)]


def test_choose_segments_checks_sizes():
    with pytest.raises(ConfigError):
        choose_segments(Segment(0, 3), [[0.0] * 3] * 2, [8] * 3, threshold=0.1)
    with pytest.raises(ConfigError):
        choose_segments(Segment(0, 3), [[0.0] * 3] * 3, [8] * 2, threshold=0.1)
