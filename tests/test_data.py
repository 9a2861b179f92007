"""aapo_trl.data: the papers' datasets (from tiny local fixtures in the Hub schemas) and the
built-in arithmetic set. Offline and fast: nothing here touches the Hub."""

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
from datasets import Dataset
from trl.data_utils import is_conversational

from aapo_trl import data
from aapo_trl.data import (
    ARITHMETIC_LEVELS,
    DAPO_USER_TEMPLATE,
    DATASET_SPECS,
    OPEN_RS_SYSTEM_PROMPT,
    QWEN_BOXED_INSTRUCTION,
    SIMPLERL_QWEN_SYSTEM_PROMPT,
    UnscorableRowsWarning,
    arithmetic_level_size,
    extract_last_boxed,
    get_dataset_spec,
    load_prompt_dataset,
    make_arithmetic_dataset,
    map_rows,
    normalize_level,
)

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def messages(row):
    return [(m["role"], m["content"]) for m in row["prompt"]]


def assert_trl_conversational(dataset):
    assert {"prompt", "solution", "row_id"} <= set(dataset.column_names)
    for row in dataset:
        assert is_conversational({"prompt": row["prompt"]})
        assert row["prompt"][-1]["role"] == "user"


# ---------------------------------------------------------------------------------------------
# The papers' datasets, through local fixtures in each Hub schema
# ---------------------------------------------------------------------------------------------


def test_open_rs_fixture():
    raw = read_jsonl(FIXTURES / "open-rs" / "train.jsonl")
    ds = load_prompt_dataset(FIXTURES / "open-rs")
    assert_trl_conversational(ds)
    assert len(ds) == len(raw) == 4
    assert list(ds["row_id"]) == [0, 1, 2, 3]
    assert list(ds["solution"]) == [r["answer"] for r in raw]
    assert list(ds["level"]) == ["Easy", "Hard", "Easy", "Hard"]
    for row, original in zip(ds, raw):
        assert messages(row) == [("system", OPEN_RS_SYSTEM_PROMPT), ("user", original["problem"])]
    assert ds[0]["solution"] == "\\frac{5}{6}"


def test_open_rs_falls_back_to_boxed_solution_when_answer_is_empty():
    raw = read_jsonl(FIXTURES / "open-rs" / "train.jsonl")
    raw[1]["answer"] = ""
    ds = map_rows(Dataset.from_list(raw), "open-rs")
    assert ds[1]["solution"] == "2"


def test_simplelr_qwen_fixture_rebuilds_the_qwen_boxed_prompt():
    raw = read_jsonl(FIXTURES / "simplelr_qwen_level3to5" / "train.jsonl")
    ds = load_prompt_dataset(FIXTURES / "simplelr_qwen_level3to5")
    assert_trl_conversational(ds)
    assert list(ds["row_id"]) == [0, 1, 2, 3]
    assert list(ds["solution"]) == [r["gt_answer"] for r in raw]
    assert list(ds["level"]) == ["3", "4", "3", "5"]
    for row, original in zip(ds, raw):
        assert messages(row) == [
            ("system", SIMPLERL_QWEN_SYSTEM_PROMPT),
            ("user", original["question"] + "\n" + QWEN_BOXED_INSTRUCTION),
        ]
        # Rendered with Qwen's chat template, the messages give back the dataset's own prompt
        # text (up to the upstream "\boxed{{}}" formatting artifact).
        rendered = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages(row))
        rendered += "<|im_start|>assistant\n"
        assert rendered == original["prompt"][0]["content"].replace("\\boxed{{}}", "\\boxed{}")


def test_simplelr_test_split_is_read_from_its_own_file():
    raw = read_jsonl(FIXTURES / "simplelr_qwen_level3to5" / "test.jsonl")
    ds = load_prompt_dataset(FIXTURES / "simplelr_qwen_level3to5", split="test")
    assert list(ds["solution"]) == [r["gt_answer"] for r in raw] == ["\\frac{2}{3}", "36"]
    assert list(ds["row_id"]) == [0, 1]
    with pytest.raises(FileNotFoundError, match="validation"):
        load_prompt_dataset(FIXTURES / "simplelr_qwen_level3to5", split="validation")


def test_simplelr_abel_fixture_has_no_system_message_and_the_abel_template():
    raw = read_jsonl(FIXTURES / "simplelr_abel_level3to5" / "train.jsonl")
    ds = load_prompt_dataset(FIXTURES / "simplelr_abel_level3to5")
    assert_trl_conversational(ds)
    for row, original in zip(ds, raw):
        assert messages(row) == [("user", original["prompt"][0]["content"])]
        assert row["prompt"][0]["content"].startswith("Question:\n" + original["question"])
    assert list(ds["solution"]) == ["56", "5", "5", "5\\sqrt{2}"]


def test_dapo_fixture_strips_and_rebuilds_the_dapo_prompt_and_deduplicates():
    raw = read_jsonl(FIXTURES / "dapo-math-17k" / "train.jsonl")
    assert raw[3] == raw[0]  # the fixture repeats a problem, as the Hub parquet does
    ds = load_prompt_dataset(FIXTURES / "dapo-math-17k")
    assert_trl_conversational(ds)
    assert len(ds) == 3
    assert list(ds["row_id"]) == [0, 1, 2]
    assert list(ds["solution"]) == [r["reward_model"]["ground_truth"] for r in raw[:3]]
    assert list(ds["level"]) == ["", "", ""]
    for row, original in zip(ds, raw):
        assert messages(row) == [("user", original["prompt"][0]["content"])]
        assert not row["question"].startswith("Solve the following")
        assert DAPO_USER_TEMPLATE.replace("{question}", row["question"]) == original["prompt"][0]["content"]
    assert len(load_prompt_dataset(FIXTURES / "dapo-math-17k", deduplicate=False)) == 4


def test_dapo_from_parquet(tmp_path):
    raw = read_jsonl(FIXTURES / "dapo-math-17k" / "train.jsonl")
    Dataset.from_list(raw).to_parquet(str(tmp_path / "train-00000-of-00001.parquet"))
    ds = load_prompt_dataset(tmp_path, dataset_format="BytedTsinghua-SIA/DAPO-Math-17k")
    assert list(ds["solution"]) == ["84", "19", "13"]


def test_math_lighteval_fixture_extracts_the_boxed_answer():
    raw = read_jsonl(FIXTURES / "math-lighteval" / "train.jsonl")
    ds = load_prompt_dataset(FIXTURES / "math-lighteval")
    assert_trl_conversational(ds)
    assert list(ds["solution"]) == ["\\frac{\\sqrt{3}}{2}", "(1,-2)", "10", "\\text{(C)}"]
    assert list(ds["level"]) == ["2", "3", "4", "5"]
    assert list(ds["row_id"]) == [0, 1, 2, 3]
    for row, original in zip(ds, raw):
        assert messages(row) == [
            ("user", original["problem"] + " Let's think step by step and output the final answer within \\boxed{}.")
        ]
    test = load_prompt_dataset(FIXTURES / "math-lighteval", split="test")
    assert list(test["solution"]) == ["\\frac{1}{8}", "56"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("$\\boxed{\\frac{\\sqrt{3}}{2}}$", "\\frac{\\sqrt{3}}{2}"),
        ("nested: \\boxed{\\left\\{ 1, \\{2\\} \\right\\}} end", "\\left\\{ 1, \\{2\\} \\right\\}"),
        ("first \\boxed{1}, then \\boxed{2}", "2"),
        ("\\fbox{7}", "7"),
        ("\\boxed{3} and last \\fbox{4}", "4"),
        ("the answer is $\\boxed 5$.", "5"),
        ("\\boxed { 12 }", "12"),
        ("\\boxed{\\text{(C)}}", "\\text{(C)}"),
        ("no box here", None),
        ("unbalanced \\boxed{\\frac{1}{2}", None),
        ("empty \\boxed{}", None),
        ("\\boxedx{3}", None),
        (None, None),
    ],
)
def test_extract_last_boxed(text, expected):
    assert extract_last_boxed(text) == expected


@pytest.mark.parametrize(
    "value, expected", [("Level 3", "3"), (3, "3"), ("3", "3"), (4.0, "4"), ("Hard", "Hard"), ("Level ?", "Level ?"), (None, "")]
)
def test_normalize_level(value, expected):
    assert normalize_level(value) == expected


@pytest.mark.parametrize("levels", [[3, 4, 5], ["Level 3", "Level 4", "Level 5"], ("3", 4, "level 5")])
def test_level_filter_math(levels):
    ds = load_prompt_dataset(FIXTURES / "math-lighteval", levels=levels)
    assert list(ds["level"]) == ["3", "4", "5"]
    assert list(ds["row_id"]) == [1, 2, 3]  # original indices survive the filter


def test_level3to5_variant_filters_by_default_and_all_disables_it():
    ds = load_prompt_dataset(FIXTURES / "math-lighteval", dataset_format="math-lighteval-level3to5")
    assert list(ds["level"]) == ["3", "4", "5"]
    assert len(load_prompt_dataset(FIXTURES / "math-lighteval", dataset_format="math-lighteval-level3to5", levels="all")) == 4


def test_level_filter_on_word_levels_and_errors():
    hard = load_prompt_dataset(FIXTURES / "open-rs", levels=["hard"])
    assert list(hard["row_id"]) == [1, 3]
    with pytest.raises(ValueError, match="levels present"):
        load_prompt_dataset(FIXTURES / "open-rs", levels=["Medium"])
    with pytest.raises(ValueError, match="no level labels"):
        load_prompt_dataset(FIXTURES / "dapo-math-17k", levels=[3])


def test_max_samples_is_a_seeded_subset_in_original_order():
    a = load_prompt_dataset(FIXTURES / "open-rs", max_samples=2, seed=1)
    b = load_prompt_dataset(FIXTURES / "open-rs", max_samples=2, seed=1)
    assert list(a["row_id"]) == list(b["row_id"]) and len(a) == 2
    assert list(a["row_id"]) == sorted(a["row_id"])
    subsets = {tuple(load_prompt_dataset(FIXTURES / "open-rs", max_samples=2, seed=s)["row_id"]) for s in range(10)}
    assert len(subsets) > 1


# ---------------------------------------------------------------------------------------------
# Validation, unscorable rows, overrides, format inference
# ---------------------------------------------------------------------------------------------


def test_missing_column_error_names_dataset_and_column(tmp_path):
    rows = read_jsonl(FIXTURES / "open-rs" / "train.jsonl")
    for row in rows:
        del row["answer"]
    path = tmp_path / "my_rs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError) as error:
        load_prompt_dataset(path, dataset_format="open-rs")
    message = str(error.value)
    assert str(path) in message and "'answer'" in message and "open-rs" in message
    assert "columns present" in message and "'problem'" in message and "'solution'" in message


def test_map_rows_validates_before_mapping():
    ds = Dataset.from_list([{"question": "1+1?", "answer": "2"}])
    with pytest.raises(ValueError, match=r"'my-set'.*missing required column\(s\) \['gt_answer'\]"):
        map_rows(ds, "simplelr_qwen_level3to5", dataset_label="my-set")


def test_unscorable_rows_are_kept_with_empty_solution_and_counted():
    rows = [
        {"problem": "p1", "level": "Level 1", "type": "Algebra", "solution": "so $\\boxed{4}$"},
        {"problem": "p2", "level": "Level 1", "type": "Algebra", "solution": "no box at all"},
        {"problem": "p3", "level": "Level 1", "type": "Algebra", "solution": "bad \\boxed{\\frac{1}{2}"},
    ]
    with pytest.warns(UnscorableRowsWarning, match="2 of 3 rows"):
        ds = map_rows(Dataset.from_list(rows), "math-lighteval")
    assert list(ds["solution"]) == ["4", "", ""]
    assert list(ds["row_id"]) == [0, 1, 2]


def test_all_rows_unscorable_raises():
    rows = [{"problem": "p", "level": "Level 1", "type": "Algebra", "solution": "no box"}] * 2
    with pytest.raises(ValueError, match="no gold answer"):
        map_rows(Dataset.from_list(rows), "math-lighteval")


def test_clean_fixtures_raise_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnscorableRowsWarning)
        for name in ("open-rs", "simplelr_qwen_level3to5", "simplelr_abel_level3to5", "dapo-math-17k", "math-lighteval"):
            load_prompt_dataset(FIXTURES / name)


def test_system_prompt_override_and_removal():
    custom = load_prompt_dataset(FIXTURES / "open-rs", system_prompt="Be brief.")
    assert messages(custom[0])[0] == ("system", "Be brief.")
    none = load_prompt_dataset(FIXTURES / "open-rs", system_prompt="")
    assert [m["role"] for m in none[0]["prompt"]] == ["user"]
    qwen = load_prompt_dataset(FIXTURES / "simplelr_qwen_level3to5", system_prompt="")
    assert [m["role"] for m in qwen[0]["prompt"]] == ["user"]
    assert qwen[0]["prompt"][0]["content"].endswith(QWEN_BOXED_INSTRUCTION)  # the user wording stays
    abel = load_prompt_dataset(FIXTURES / "simplelr_abel_level3to5", system_prompt="You solve math.")
    assert messages(abel[0])[0] == ("system", "You solve math.")


def test_user_template_override():
    ds = load_prompt_dataset(FIXTURES / "dapo-math-17k", user_template="{question}\nPut the answer in \\boxed{}.")
    assert ds[0]["prompt"][-1]["content"] == ds[0]["question"] + "\nPut the answer in \\boxed{}."
    with pytest.raises(ValueError, match="must contain"):
        load_prompt_dataset(FIXTURES / "dapo-math-17k", user_template="no placeholder")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("open-rs", "open-rs"),
        ("simplelr_qwen_level3to5", "simplelr_qwen_level3to5"),
        ("simplelr_abel_level3to5", "simplelr_abel_level3to5"),
        ("dapo-math-17k", "dapo-math-17k"),
        ("math-lighteval", "math-lighteval"),
    ],
)
def test_format_is_inferred_from_columns_when_the_path_has_no_name(tmp_path, name, expected):
    target = tmp_path / "data.jsonl"
    shutil.copy(FIXTURES / name / "train.jsonl", target)
    inferred = data._infer_spec(data._load_local(target, "train"), str(target))
    assert inferred.name == expected
    by_path = load_prompt_dataset(FIXTURES / name)
    assert list(load_prompt_dataset(target)["prompt"]) == list(by_path["prompt"])


def test_unknown_local_format_is_a_clear_error(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"foo": 1, "bar": "x"}) + "\n")
    with pytest.raises(ValueError, match="matches no known format"):
        load_prompt_dataset(path)


def test_registry_names_and_aliases():
    assert set(DATASET_SPECS) >= {
        "open-rs",
        "simplelr_qwen_level3to5",
        "simplelr_abel_level3to5",
        "dapo-math-17k",
        "math-lighteval",
    }
    assert get_dataset_spec("knoveleng/open-rs").name == "open-rs"
    assert get_dataset_spec("SimpleRL-Zoo-Data/simplelr_qwen_level3to5").name == "simplelr_qwen_level3to5"
    assert get_dataset_spec("simplelr_able_level3to5").name == "simplelr_abel_level3to5"  # AAPO's spelling
    assert get_dataset_spec("BytedTsinghua-SIA/DAPO-Math-17k").name == "dapo-math-17k"
    assert get_dataset_spec("DigitalLearningGmbH/MATH-lighteval").name == "math-lighteval"
    assert get_dataset_spec("MATH_LIGHTEVAL").name == "math-lighteval"
    for spec in DATASET_SPECS.values():
        assert "{question}" in spec.user_template and spec.hub_id and spec.source
    assert DATASET_SPECS["simplelr_abel_level3to5"].system_prompt is None
    assert DATASET_SPECS["open-rs"].system_prompt == OPEN_RS_SYSTEM_PROMPT
    with pytest.raises(KeyError, match="Known"):
        get_dataset_spec("no-such-dataset")
    with pytest.raises(KeyError):
        load_prompt_dataset("no-such-dataset")  # neither a path nor a name: fails before any download


# ---------------------------------------------------------------------------------------------
# The arithmetic dataset
# ---------------------------------------------------------------------------------------------


def evaluate(question):
    match = re.fullmatch(r"What is (\d+) ([+*-]) (\d+)\?", question)
    if match:
        a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
        return {"+": a + b, "-": a - b, "*": a * b}[op]
    match = re.fullmatch(r"Solve for x: (\d+)x \+ (\d+) = (\d+)\.", question)
    assert match, question
    a, b, c = map(int, match.groups())
    assert (c - b) % a == 0
    return (c - b) // a


def rows_of(dataset):
    return [(r["question"], r["solution"], r["level"], r["row_id"], json.dumps(r["prompt"])) for r in dataset]


def test_arithmetic_is_deterministic_and_seed_dependent():
    a = make_arithmetic_dataset(levels=ARITHMETIC_LEVELS, num_train=10, num_test=5, seed=0)
    b = make_arithmetic_dataset(levels=ARITHMETIC_LEVELS, num_train=10, num_test=5, seed=0)
    c = make_arithmetic_dataset(levels=ARITHMETIC_LEVELS, num_train=10, num_test=5, seed=1)
    for split in ("train", "test"):
        assert rows_of(a[split]) == rows_of(b[split])
        assert rows_of(a[split]) != rows_of(c[split])


def test_arithmetic_splits_are_disjoint_answers_correct_and_levels_covered():
    dd = make_arithmetic_dataset(levels=ARITHMETIC_LEVELS, num_train=30, num_test=10, seed=3)
    assert set(dd) == {"train", "test"}
    train, test = dd["train"], dd["test"]
    assert set(train["question"]).isdisjoint(test["question"])
    assert set(train["row_id"]).isdisjoint(test["row_id"])
    for split, per_level in ((train, 30), (test, 10)):
        assert len(set(split["question"])) == len(split)  # no repeats
        assert len(set(split["row_id"])) == len(split)
        for level in ARITHMETIC_LEVELS:
            assert list(split["level"]).count(level) == per_level
        for row in split:
            assert row["solution"] == str(evaluate(row["question"]))
            if row["level"].startswith("sub"):
                assert int(row["solution"]) >= 0
            assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
            assert row["prompt"][0]["content"].endswith(f"Question: {row['question']}\nAnswer:")
    assert_trl_conversational(train)


def test_arithmetic_prompt_shows_one_boxed_example():
    row = make_arithmetic_dataset(levels=["add1"], num_test=1, seed=0)["test"][0]
    content = row["prompt"][0]["content"]
    assert content.count("Question:") == 2
    assert "Example:" in content and "\\boxed{7}" in content and "3 + 4 = 7" in content
    plain = make_arithmetic_dataset(levels=["add1"], num_test=1, seed=0, prompt_style="plain")["test"][0]
    assert "\\boxed" not in plain["prompt"][0]["content"]
    with_system = make_arithmetic_dataset(levels=["add1"], num_test=1, system_prompt="Be exact.")["test"][0]
    assert messages(with_system)[0] == ("system", "Be exact.")


def test_arithmetic_one_digit_pools_are_exhausted_without_repeats():
    assert arithmetic_level_size("add1") == 99  # 100 problems less the worked example 3 + 4
    assert arithmetic_level_size("sub1") == 54  # a >= b, less 8 - 3
    dd = make_arithmetic_dataset(levels=["add1"], num_test=19, seed=0)  # num_train=None: the rest
    assert len(dd["test"]) == 19 and len(dd["train"]) == 80
    everything = set(dd["train"]["question"]) | set(dd["test"]["question"])
    assert len(everything) == 99 and "What is 3 + 4?" not in everything


def test_arithmetic_over_request_warns_and_caps_or_raises():
    with pytest.warns(UserWarning, match="only 99 distinct problems.*capped at 79"):
        dd = make_arithmetic_dataset(levels=["add1"], num_train=1000, num_test=20)
    assert len(dd["train"]) == 79 and len(dd["test"]) == 20
    with pytest.raises(ValueError, match="add1"):
        make_arithmetic_dataset(levels=["add1"], num_train=1000, num_test=20, on_overflow="error")
    with pytest.raises(ValueError, match="num_test=500"):
        make_arithmetic_dataset(levels=["sub1"], num_test=500)
    with pytest.raises(ValueError, match="Unknown arithmetic level"):
        make_arithmetic_dataset(levels=["div1"])


def test_arithmetic_test_split_does_not_depend_on_train_size():
    small = make_arithmetic_dataset(levels=["add1", "mul1"], num_train=5, num_test=10, seed=7)
    large = make_arithmetic_dataset(levels=["add1", "mul1"], num_train=50, num_test=10, seed=7)
    assert rows_of(small["test"]) == rows_of(large["test"])


def test_load_prompt_dataset_arithmetic_returns_the_split():
    dd = make_arithmetic_dataset(levels=["add1", "sub1"], num_test=10, seed=2)
    test = load_prompt_dataset("arithmetic", split="test", levels=["add1", "sub1"], seed=2, num_test=10)
    assert rows_of(test) == rows_of(dd["test"])
    train = load_prompt_dataset("arithmetic", levels=["add1", "sub1"], seed=2, num_test=10, max_samples=16)
    assert rows_of(train) == rows_of(dd["train"])[:16]
    default = load_prompt_dataset("arithmetic")
    assert set(default["level"]) == {"add1", "sub1", "mul1"}
    with pytest.raises(KeyError, match="splits"):
        load_prompt_dataset("arithmetic", split="validation")


def test_levels_all_gives_every_arithmetic_level():
    ds = load_prompt_dataset("arithmetic", split="test", levels="all", num_test=2)
    assert sorted(set(ds["level"])) == sorted(ARITHMETIC_LEVELS)


@pytest.mark.parametrize(
    "name, split, expected_args, expected_kwargs",
    [
        (
            "simplelr_qwen_level3to5",
            "test",
            ("hkust-nlp/SimpleRL-Zoo-Data",),
            {"data_files": {"test": "simplelr_qwen_level3to5/test.parquet"}, "split": "test"},
        ),
        (
            "SimpleRL-Zoo-Data/simplelr_abel_level3to5",
            None,
            ("hkust-nlp/SimpleRL-Zoo-Data",),
            {"data_files": {"train": "simplelr_abel_level3to5/train.parquet"}, "split": "train"},
        ),
        ("knoveleng/open-rs", None, ("knoveleng/open-rs",), {"split": "train"}),
        ("dapo-math-17k", None, ("BytedTsinghua-SIA/DAPO-Math-17k",), {"split": "train"}),
        ("math-lighteval", "test", ("DigitalLearningGmbH/MATH-lighteval",), {"split": "test"}),
    ],
)
def test_hub_names_call_load_dataset_with_the_right_arguments(
    monkeypatch, name, split, expected_args, expected_kwargs
):
    """The Hub path, checked without the network: load_dataset is replaced by the fixture."""
    import datasets

    fixture = {
        "simplelr_qwen_level3to5": "simplelr_qwen_level3to5",
        "SimpleRL-Zoo-Data/simplelr_abel_level3to5": "simplelr_abel_level3to5",
        "knoveleng/open-rs": "open-rs",
        "dapo-math-17k": "dapo-math-17k",
        "math-lighteval": "math-lighteval",
    }[name]
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return Dataset.from_list(read_jsonl(FIXTURES / fixture / f"{kwargs['split']}.jsonl"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_prompt_dataset(name, split=split)
    assert calls == [(expected_args, expected_kwargs)]
    assert_trl_conversational(ds)
    assert all(ds["solution"])


def test_mixture_concatenates_with_unique_stable_row_ids():
    from aapo_trl.data import MIXTURE_ROW_ID_STRIDE, load_dataset_mixture

    mix = load_dataset_mixture("arithmetic+arithmetic", levels=["add1"], num_test=5, seed=1)
    single = load_prompt_dataset("arithmetic", levels=["add1"], num_test=5, seed=1)
    assert len(mix) == 2 * len(single)
    assert len(set(mix["row_id"])) == len(mix)
    assert mix["row_id"][len(single):] == [MIXTURE_ROW_ID_STRIDE + r for r in single["row_id"]]
    assert load_dataset_mixture("arithmetic", levels=["add1"], num_test=5, seed=1)["row_id"] == single["row_id"]
