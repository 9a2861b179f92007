"""Reward functions (aapo_trl/rewards.py): values from the papers / open-r1 / TESTBED.md, offline and fast."""

import math
import pickle
import threading

import pytest

from aapo_trl.rewards import (
    REWARD_REGISTRY,
    accuracy_reward,
    completion_text,
    final_number_reward,
    format_reward,
    get_reward_funcs,
    make_accuracy_zapo_reward,
    make_cosine_reward,
    tag_count_reward,
)

accuracy_zapo = REWARD_REGISTRY["accuracy_zapo"]
cosine = REWARD_REGISTRY["cosine"]

# What TRL passes besides completions and solution; every reward must accept and ignore it.
TRL_KWARGS = dict(trainer_state=None, log_extra=lambda *a: None, log_metric=lambda *a: None)


def conv(text):
    return [{"role": "assistant", "content": text}]


def call(func, completions, solution=None, **kwargs):
    prompts = ["What is 6 + 8?"] * len(completions)
    return func(prompts=prompts, completions=completions, solution=solution, **TRL_KWARGS, **kwargs)


# --------------------------------------------------------------------------- completion_text


def test_completion_text_plain_and_conversational():
    assert completion_text("abc") == "abc"
    assert completion_text(conv("abc")) == "abc"
    assert completion_text({"role": "assistant", "content": "abc"}) == "abc"
    assert completion_text([{"content": "abc"}]) == "abc"


def test_completion_text_keeps_assistant_turns_and_text_parts():
    turns = [
        {"role": "assistant", "content": "call", "tool_calls": []},
        {"role": "tool", "content": "tool output"},
        {"role": "assistant", "content": [{"type": "text", "text": "\\boxed{1}"}]},
        {"role": "assistant", "content": None},
    ]
    assert completion_text(turns) == "call\n\\boxed{1}\n"


def test_completion_text_rejects_other_types():
    with pytest.raises(TypeError):
        completion_text(3)


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("wrap", [str, conv], ids=["plain", "conversational"])
def test_accuracy_right_wrong_and_malformed(wrap):
    completions = [
        "The answer is \\boxed{14}.",
        "The answer is \\boxed{15}.",
        "I do not know.",  # no answer
        "",  # empty
        "\\boxed{\\frac{1}{",  # garbage LaTeX
        "Final answer: $14$",  # anchored LaTeX without a box
    ]
    assert call(accuracy_reward, [wrap(c) for c in completions], ["14"] * 6) == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_accuracy_restating_the_question_does_not_score():
    # TESTBED.md: math-verify's default parsing evaluates "6 + 8" and calls it correct for gold 14.
    completions = ["6 + 8", "What is 6 + 8? 6 + 8", "What is $6 + 8$?", "$14$ is not anchored"]
    assert call(accuracy_reward, completions, ["14"] * 4) == [0.0, 0.0, 0.0, 0.0]


def test_accuracy_boxed_answer_comes_first():
    # The boxed answer wins over an anchored answer written after it.
    assert call(accuracy_reward, ["\\boxed{15} so the answer is $14$"], ["14"]) == [0.0]
    assert call(accuracy_reward, ["The answer is $15$, i.e. \\boxed{14}"], ["14"]) == [1.0]


@pytest.mark.parametrize("gold", ["\\frac{1}{2}", "0.5", "$\\frac{1}{2}$", "\\boxed{\\frac{1}{2}}", 0.5])
def test_accuracy_fractions(gold):
    completions = [
        "\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{\\dfrac{1}{2}}", "\\boxed{1/2}", "\\boxed{\\frac{1}{3}}",
    ]
    assert call(accuracy_reward, completions, [gold] * 5) == [1.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    "gold, right, wrong",
    [
        ("2^{10}", "\\boxed{1024}", "\\boxed{2}"),  # parsed as is, this bare gold would read as 2
        ("3\\sqrt{3}", "\\boxed{\\sqrt{27}}", "\\boxed{3}"),
        ("1,234", "\\boxed{1234}", "\\boxed{1}"),
        ("The answer is $\\boxed{\\frac{3}{4}}$.", "\\boxed{0.75}", "\\boxed{3}"),  # a full solution text
        (14, "\\boxed{14}", "\\boxed{41}"),  # a number column
    ],
)
def test_accuracy_gold_forms(gold, right, wrong):
    assert call(accuracy_reward, [right, wrong], [gold, gold]) == [1.0, 0.0]


@pytest.mark.parametrize("gold", ["", "   ", "\\frac{1}{", "???", None, ["14"]])
def test_accuracy_unparseable_gold_is_unscorable(gold):
    # The authors' code returns 1.0 here, rewarding every response to a broken row.
    assert call(accuracy_reward, ["\\boxed{14}", "???", ""], [gold] * 3) == [None, None, None]


def test_accuracy_verification_error_gives_zero(monkeypatch):
    import aapo_trl.rewards as rewards

    def broken_verify(*args, **kwargs):
        raise RuntimeError("sympy exploded")

    monkeypatch.setattr(rewards, "verify", broken_verify)
    assert call(accuracy_reward, ["\\boxed{14}"], ["14"]) == [0.0]


def test_accuracy_needs_one_solution_per_completion():
    with pytest.raises(ValueError, match="solution"):
        call(accuracy_reward, ["\\boxed{14}"])
    with pytest.raises(ValueError, match="one `solution` per completion"):
        call(accuracy_reward, ["\\boxed{14}", "\\boxed{14}"], ["14"])
    with pytest.raises(ValueError, match="one `solution` per completion"):
        call(accuracy_reward, ["\\boxed{14}"], "14")


def test_accuracy_works_off_the_main_thread():
    # math-verify 0.5.2's signal timeouts fail off the main thread and it swallows the error (every LaTeX
    # parse falls back to a string, every verify is False). Fresh expressions, so no cached parse helps.
    result = {}

    def score():
        completions = ["\\boxed{\\frac{7}{13}}", "\\boxed{3^{5}}", "\\boxed{1}"]
        result["r"] = accuracy_reward(completions, ["\\frac{14}{26}", "243", "2"])

    thread = threading.Thread(target=score)
    thread.start()
    thread.join()
    assert result["r"] == [1.0, 1.0, 0.0]


# --------------------------------------------------------------------------- format / tag_count


@pytest.mark.parametrize("wrap", [str, conv], ids=["plain", "conversational"])
def test_format(wrap):
    completions = [
        "<think>\nreasoning\n</think>\n\\boxed{14}",  # right
        "reasoning\n</think>\nanswer",  # the opening tag is not required (open-rs)
        "<think>\nreasoning</think>\n\\boxed{14}",  # no newline before </think>
        "<think>\na\n</think>\nb\n</think>\nc",  # the delimiter twice
        "",
        "\\boxed{14}",
    ]
    assert call(format_reward, [wrap(c) for c in completions]) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("wrap", [str, conv], ids=["plain", "conversational"])
def test_tag_count(wrap):
    completions = [
        "<think>\nr\n</think>\n<answer>\n14\n</answer>",  # all four tags once
        "<think>\nr\n</think>\n",  # two
        "<think>\nr\n</think>\n<answer>\n14\n</answer>\n<answer>\n15\n</answer>",  # answer tags twice
        "<think>r</think><answer>14</answer>",  # no newlines: none counts
        "",
        "<think>\n",
    ]
    assert call(tag_count_reward, [wrap(c) for c in completions]) == [1.0, 0.5, 0.5, 0.0, 0.0, 0.25]


# --------------------------------------------------------------------------- cosine


def cosine_formula(length, correct, max_len=1000):
    """open-r1's formula, written out independently, with the progress clipped."""
    v_min, v_max = (0.5, 1.0) if correct else (-0.5, -1.0)
    progress = min(length / max_len, 1.0)
    return v_min + 0.5 * (v_max - v_min) * (1.0 + math.cos(progress * math.pi))


@pytest.mark.parametrize(
    "length, right, wrong",
    [(0, 1.0, -1.0), (500, 0.75, -0.75), (1000, 0.5, -0.5), (2000, 0.5, -0.5)],
)
def test_cosine_values_in_tokens(length, right, wrong):
    completions = ["\\boxed{14}", "\\boxed{15}", "no answer at all"]
    got = call(cosine, completions, ["14"] * 3, completion_ids=[[7] * length] * 3)
    assert got == pytest.approx([right, wrong, wrong], abs=1e-12)
    assert got == pytest.approx([cosine_formula(length, True), cosine_formula(length, False)] + [wrong], abs=1e-12)


def test_cosine_is_clipped_past_max_len():
    lengths = [1000, 1500, 2000, 10_000]
    right = [call(cosine, ["\\boxed{14}"], ["14"], completion_ids=[[1] * n])[0] for n in lengths]
    wrong = [call(cosine, ["\\boxed{15}"], ["14"], completion_ids=[[1] * n])[0] for n in lengths]
    assert right == pytest.approx([0.5] * 4)
    assert wrong == pytest.approx([-0.5] * 4)


def test_cosine_is_monotone_in_length():
    ids = [[1] * n for n in range(0, 1200, 100)]
    right = call(cosine, ["\\boxed{14}"] * len(ids), ["14"] * len(ids), completion_ids=ids)
    wrong = call(cosine, ["\\boxed{15}"] * len(ids), ["14"] * len(ids), completion_ids=ids)
    assert all(a >= b for a, b in zip(right, right[1:]))  # longer correct answers earn less
    assert all(a <= b for a, b in zip(wrong, wrong[1:]))  # longer wrong answers are penalised less


def test_cosine_in_characters_and_custom_values():
    reward = make_cosine_reward(
        min_value_wrong=-2.0, max_value_wrong=0.0, min_value_correct=1.0, max_value_correct=3.0, max_len=20,
        length_unit="characters",
    )
    assert reward.__name__ == "cosine"
    right, wrong = "\\boxed{14}", "\\boxed{15}"  # 10 characters: half of max_len
    got = call(reward, [conv(right), wrong, right + " " * 10, wrong + " " * 30], ["14"] * 4, completion_ids=[[1]] * 4)
    assert got == pytest.approx([2.0, -1.0, 1.0, 0.0])


def test_cosine_tokens_without_ids_falls_back_to_characters():
    reward = make_cosine_reward(max_len=20)
    with pytest.warns(UserWarning, match="characters"):
        assert reward(["\\boxed{14}"], ["14"]) == pytest.approx([0.75])


def test_cosine_unparseable_gold_and_malformed_answers():
    completions = ["\\boxed{14}", "", "\\boxed{\\frac{1}{"]
    assert call(cosine, completions, ["\\frac{1}{"] * 3, completion_ids=[[1]] * 3) == [None, None, None]
    got = call(cosine, completions[1:], ["14"] * 2, completion_ids=[[], []])
    assert got == pytest.approx([-1.0, -1.0])


def test_cosine_rejects_bad_settings():
    with pytest.raises(ValueError):
        make_cosine_reward(max_len=0)
    with pytest.raises(ValueError):
        make_cosine_reward(length_unit="words")


# --------------------------------------------------------------------------- accuracy_zapo


@pytest.mark.parametrize("wrap", [str, conv], ids=["plain", "conversational"])
def test_accuracy_zapo(wrap):
    completions = ["\\boxed{14}", "\\boxed{15}", "6 + 8", "", "\\boxed{\\frac{1}{", "\\boxed{}"]
    # An extracted but unparseable answer is a wrong answer (0.1); nothing extracted is 0.
    assert call(accuracy_zapo, [wrap(c) for c in completions], ["14"] * 6) == [1.0, 0.1, 0.0, 0.0, 0.1, 0.0]


def test_accuracy_zapo_fractions_and_unparseable_gold():
    assert call(accuracy_zapo, ["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}"], ["0.5", "\\frac{1}{2}"]) == [1.0, 1.0]
    assert call(accuracy_zapo, ["\\boxed{14}", ""], ["???", ""]) == [None, None]


def test_accuracy_zapo_configurable():
    reward = make_accuracy_zapo_reward(correct=2.0, incorrect=-1.0, no_answer=-3.0)
    assert reward.__name__ == "accuracy_zapo"
    assert call(reward, ["\\boxed{14}", "\\boxed{15}", "nothing"], ["14"] * 3) == [2.0, -1.0, -3.0]


# --------------------------------------------------------------------------- final_number


@pytest.mark.parametrize("wrap", [str, conv], ids=["plain", "conversational"])
def test_final_number_right_and_wrong(wrap):
    completions = ["6 + 8 = 14", "6 + 8 = 15", "The answer is 14.", "14 apples, then 2", "no number", ""]
    assert call(final_number_reward, [wrap(c) for c in completions], ["14"] * 6) == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "text, gold, expected",
    [
        ("total: 1,234", "1234", 1.0),  # thousands separators
        ("total: 1,234,567.5", 1234567.5, 1.0),
        ("1,2345", "2345", 1.0),  # not a thousands group: two numbers
        ("x = -5", "-5", 1.0),  # a sign
        ("(-3)", -3, 1.0),
        ("10-5", "5", 1.0),  # a minus after a digit is an operator
        ("14.0", 14, 1.0),  # compared numerically
        ("0.50", "0.5", 1.0),
        (".5", 0.5, 1.0),
        ("3.14.", "3.14", 1.0),  # a final full stop is not a decimal point
        ("\\boxed{6 + 8}", "14", 0.0),  # restating the question does not score
        ("14", "-14", 0.0),
        ("1,234", "1,234", 1.0),
    ],
)
def test_final_number_number_forms(text, gold, expected):
    assert call(final_number_reward, [text], [gold]) == [expected]


@pytest.mark.parametrize("gold", ["\\frac{1}{2}", "fourteen", "", "1e3", "$14$", None, True, float("nan"), [14]])
def test_final_number_gold_not_a_number(gold):
    assert call(final_number_reward, ["14", ""], [gold, gold]) == [None, None]


# --------------------------------------------------------------------------- registry


def test_registry_names_and_protocol():
    assert set(REWARD_REGISTRY) == {
        "accuracy", "format", "open_r1_format", "tag_count", "cosine", "accuracy_zapo", "final_number",
        "final_number_zapo", "soft_overlong_punishment",
    }
    completions = [conv("<think>\nr\n</think>\n\\boxed{14}"), "14"]
    for name, func in REWARD_REGISTRY.items():
        assert func.__name__ == name
        values = call(func, completions, ["14", "14"], completion_ids=[[1, 2], [3]])
        assert len(values) == 2 and all(v is None or isinstance(v, float) for v in values)
        assert pickle.loads(pickle.dumps(func)).__name__ == name  # TRL may ship reward functions to a process


def test_get_reward_funcs():
    assert get_reward_funcs(["accuracy", "format"]) == [accuracy_reward, format_reward]
    assert get_reward_funcs("accuracy") == [accuracy_reward]
    assert get_reward_funcs("cosine, format") == [REWARD_REGISTRY["cosine"], format_reward]


def test_get_reward_funcs_unknown_name():
    with pytest.raises(ValueError) as error:
        get_reward_funcs(["accuracy", "acuracy"])
    message = str(error.value)
    assert "'acuracy'" in message
    for name in REWARD_REGISTRY:
        assert name in message
    with pytest.raises(ValueError):
        get_reward_funcs([])


def test_final_number_zapo_has_three_levels():
    from aapo_trl.rewards import REWARD_REGISTRY

    reward = REWARD_REGISTRY["final_number_zapo"]
    completions = ["3 + 4 = 7", "3 + 4 = 8", "no idea", "seven"]
    assert reward(completions, solution=["7", "7", "7", "x"]) == [1.0, 0.1, 0.0, None]
    assert reward.__name__ == "final_number_zapo"


def test_dapo_answer_line_is_read_when_there_is_no_boxed_answer():
    from aapo_trl.rewards import REWARD_REGISTRY

    accuracy, zapo = REWARD_REGISTRY["accuracy"], REWARD_REGISTRY["accuracy_zapo"]
    completions = ["Let me compute.\nAnswer: 42", "So\nAnswer: $\\frac{1}{2}$", "Answer: 41", "no answer here",
                   "Answer: 7 but \\boxed{42}"]
    golds = ["42", "\\frac{1}{2}", "42", "42", "42"]
    assert accuracy(completions, solution=golds) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert zapo(completions, solution=golds) == [1.0, 1.0, 0.1, 0.0, 1.0]


def test_dapo_answer_line_is_graded_like_dapo_not_evaluated():
    """Issue 14 part 9: DAPO's verl scorer (math_dapo) compares the normalised Answer: string with the gold;
    it evaluates nothing, so restating the question in the Answer: line does not score."""
    completions = ["6 + 8 is what we need.\nAnswer: 6+8", "Answer: 14", "Answer: $14$.", "So x = 14.\nAnswer: x = 14",
                   "Answer: 14 dollars", "Answer: 1,014"]
    golds = ["14", "14", "14", "14", "14", "1014"]
    assert call(accuracy_reward, completions, golds) == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert call(accuracy_zapo, completions[:2], golds[:2]) == [0.1, 1.0]  # an answer, but a wrong one


def test_dapo_answer_line_fractions_follow_the_normaliser():
    # DAPO's normaliser expands \frac12 to \frac{1}{2} but does not evaluate: \frac{1}{2} is not "1/2" or 0.5.
    completions = ["Answer: \\frac{1}{2}", "Answer: \\frac12", "Answer: \\frac{1}{2}", "Answer: 1/2"]
    golds = ["1/2", "\\frac{1}{2}", "\\frac{1}{2}", "1/2"]
    assert call(accuracy_reward, completions, golds) == [0.0, 1.0, 1.0, 1.0]


def test_boxed_answer_stays_on_math_verify_next_to_an_answer_line():
    # A boxed answer is graded by math-verify (equivalent forms match); an Answer: line does not override it.
    completions = ["\\boxed{\\frac{1}{2}}\nAnswer: 0.5", "\\boxed{0.5}", "Answer: 14\n\\boxed{15}"]
    assert call(accuracy_reward, completions, ["1/2", "\\frac{1}{2}", "14"]) == [1.0, 1.0, 0.0]


def test_dapo_answer_line_only_in_the_last_300_characters():
    # As verl's math_dapo: the Answer: line is looked for in the response's last 300 characters.
    early = "Answer: 14\n" + "and some more thinking. " * 20
    assert call(accuracy_zapo, [early, "Answer: 14\n" + "x" * 280], ["14", "14"]) == [0.0, 1.0]


def test_normalize_dapo_answer():
    from aapo_trl.rewards import normalize_dapo_answer

    cases = {"6+8": "6+8", " 14 ": "14", "$14$.": "14", "x = 14": "14", "1,000": "1000", "14 dollars": "14",
             "\\frac12": "\\frac{1}{2}", "\\sqrt2": "\\sqrt{2}", "\\text{(A)}": "(A)", "\\boxed{7}": "7",
             "10^\\circ": "10", "The final answer is $5$": "5"}
    assert {text: normalize_dapo_answer(text) for text in cases} == cases
