"""The real-engine tests' greedy-completion check (_greedy_paths.py) on hand-made log-probs, in every environment.

The log-probs are those a CPU with AVX-512 bf16 instructions gave the embedded model after one of the recorded
prompts: tokens 35 and 2068 tied exactly at the maximum (both -2.278607). There ``top_k=1`` sampled
``[2068, 803, 216, 35]`` where greedy decoding gave ``[35, 1232, 216, 36]``; both are greedy completions of the same
weights. The table stands in for the engine, so the tie is exercised the same way on every machine, also on CPUs
whose kernels never produce it.
"""

from __future__ import annotations

import pytest

from _greedy_paths import greedy_paths, tied_at_maximum

PROMPT = [1, 2, 3]
EOS = 2
MAX_TOKENS = 4
TIE = -2.278607

# the next token's top log-probs after each sequence (prompt and completion so far)
TIED_TABLE = {
    (1, 2, 3): {35: TIE, 2068: TIE, 7: -3.1},
    (1, 2, 3, 35): {1232: -0.5, 803: -1.2},
    (1, 2, 3, 35, 1232): {216: -0.1, EOS: -0.1},
    (1, 2, 3, 35, 1232, 216): {36: -0.2, 35: -2.0},
    (1, 2, 3, 2068): {803: -0.3, 1232: -1.9},
    (1, 2, 3, 2068, 803): {216: -0.2, 36: -2.2},
    (1, 2, 3, 2068, 803, 216): {35: -0.4, 36: -0.9},
    (1, 2, 3, 7): {5: -0.1},
}
GREEDY = [35, 1232, 216, 36]
SAMPLED_AT_THE_TIE = [2068, 803, 216, 35]


def table_engine(table: dict, calls: list | None = None):
    """Greedy decoding of ``table``: each step's first maximal token (as ``argmax``), stopping at EOS."""

    def greedy_decode(prompts, max_tokens):
        if calls is not None:
            calls.append(([list(p) for p in prompts], max_tokens))
        decoded = []
        for prompt in prompts:
            sequence, tokens, tops = list(prompt), [], []
            while len(tokens) < max_tokens:
                top = table[tuple(sequence)]
                token = max(top, key=top.get)
                tokens.append(token)
                tops.append(dict(top))
                sequence.append(token)
                if token == EOS:
                    break
            decoded.append((tokens, tops))
        return decoded

    return greedy_decode


def greedy_path(completion, table=TIED_TABLE) -> bool:
    return greedy_paths([PROMPT], [completion], table_engine(table), MAX_TOKENS, {EOS})[0]


def test_the_greedy_completion_is_a_greedy_path():
    assert table_engine(TIED_TABLE)([PROMPT], MAX_TOKENS)[0][0] == GREEDY
    assert greedy_path(GREEDY)


def test_a_sample_that_takes_the_other_token_of_an_exact_tie_is_a_greedy_path():
    assert SAMPLED_AT_THE_TIE != GREEDY  # what the tests compared before, and failed on with these log-probs
    calls = []
    assert greedy_paths([PROMPT], [SAMPLED_AT_THE_TIE], table_engine(TIED_TABLE, calls), MAX_TOKENS, {EOS}) == [True]
    # after the tie the engine decodes greedily again, from the prompt and the sample's tied token
    assert calls == [([PROMPT], MAX_TOKENS), ([PROMPT + [2068]], MAX_TOKENS - 1)]


def test_a_sample_at_a_tied_end_token_is_a_greedy_path_and_one_that_stops_early_is_not():
    assert greedy_path([35, 1232, EOS])  # EOS tied with 216 at the maximum
    assert not greedy_path([35, 1232])  # greedy decoding went on
    assert not greedy_path([35, 1232, 216])


@pytest.mark.parametrize("completion", [
    [2068, 803, 216, 36],  # the tie taken, then a token below the maximum
    [7, 5],  # a token below the maximum at the first step
    [35, 1232, 216, 35],  # below the maximum at the last step
    [35, 999, 216, 36],  # a token outside the step's top log-probs
], ids=["after-the-tie", "first-step", "last-step", "not-in-top"])
def test_a_token_below_the_maximum_is_not_a_greedy_path(completion):
    assert not greedy_path(completion)


def test_a_near_tie_is_not_a_tie():
    near = {**TIED_TABLE, (1, 2, 3): {35: TIE, 2068: TIE - 1e-6, 7: -3.1}}
    assert greedy_path(GREEDY, near)
    assert not greedy_path(SAMPLED_AT_THE_TIE, near)


def test_tied_at_maximum():
    top = {35: TIE, 2068: TIE, 7: -3.1}
    assert tied_at_maximum(35, top) and tied_at_maximum(2068, top)
    assert not tied_at_maximum(7, top) and not tied_at_maximum(8, top)
    assert tied_at_maximum(35, {35: TIE})


def test_a_token_missing_from_top_log_probs_that_are_all_tied_is_undecided():
    with pytest.raises(ValueError, match="all 2 top log-probs tie at the maximum and token 8 is not among them"):
        tied_at_maximum(8, {35: TIE, 2068: TIE})


def test_the_prompts_and_completions_must_pair_up():
    with pytest.raises(ValueError):
        greedy_paths([PROMPT, PROMPT], [GREEDY], table_engine(TIED_TABLE), MAX_TOKENS, {EOS})
