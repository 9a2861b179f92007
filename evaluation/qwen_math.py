"""``--scoring qwen``: the Qwen2.5-Math evaluation toolkit's grader, written against its rules.

Most RL-for-reasoning tables outside open-r1 (SimpleRL, PRIME, Dr. GRPO, SkyThought, ...) are graded by
``QwenLM/Qwen2.5-Math``'s ``evaluation/`` toolkit: the answer is read with ``parser.extract_answer``,
normalised with ``parser.strip_string`` and compared with ``grader.math_equal``. No maintained package on
the index implements that grader (``mathruler`` 0.1.0 is PRM800K's grader; ``latex2sympy2`` is only the
toolkit's LaTeX parser, and pins an ANTLR runtime that math-verify's cannot share; verl's ``prime_math``
would need verl, which requires transformers < 5.11), so this module implements the toolkit's rules
(read at QwenLM/Qwen2.5-Math ``evaluation/parser.py`` and ``evaluation/grader.py``; none of its code is
copied):

**Extraction** (``extract_answer``): the text between ``final answer is $`` and ``$. I hope`` (Minerva's
few-shot format) if both occur; else the content of the last ``boxed`` (balanced braces; ``\\boxed 5``
up to the next ``$``); else what follows the last ``he answer is`` / ``final answer is``; else the last
number (commas dropped). Newlines are dropped, a leading ``:`` and a trailing ``.`` or ``/`` removed,
then :func:`strip_string` (without the unit word list on Minerva, as the toolkit's ``minerva_math``),
twice, as the toolkit's ``run_execute`` normalises the extracted answer again.

**Golds** (``parse_ground_truth``): MATH-500's and Minerva's from the solution through the same
extraction (MATH-500's normalised once more, Minerva's not); OlympiadBench's ``final_answer[0]``
without outer ``$``; AIME's / AMC's ``answer``; all but Minerva's through :func:`strip_string`.

**math_equal**: equal as lower-case text; a single letter A-E against the last A-E of the answer;
both numbers (commas dropped, a trailing ``%`` divides by 100) and equal within ``rel_tol=1e-4`` to the
gold, the gold / 100 or the gold x 100; equal once ``{}()`` are dropped (with ``[]`` too when one side is
an interval the other is not); element-wise for two bracketed lists of the same length or two matrices;
for equations, ``a = b`` both sides as ``a - (b)`` (either sign), a short left side (``x = 5``) dropped;
else symbolically: both parsed (LaTeX, then a Python expression), equal as text or as sympy objects, or
``simplify(a - b) == 0``, or numerically within ``rel_tol=1e-4``, within a time limit as the
toolkit's ``timeout=True`` run.

Where this differs from the toolkit, and why: LaTeX is parsed with ``latex2sympy2_extended`` (the
parser math-verify ships; the toolkit's ``latex2sympy2`` fork and sympy's ANTLR parser need another
ANTLR runtime); a word number is converted only when the whole answer is English number words (the
toolkit calls ``word2number``, not a dependency here); the time limit is a 5 s signal alarm in the main
thread (no limit elsewhere) instead of a 1 s subprocess, so that grades do not depend on the machine's load.
"""

from __future__ import annotations

import math
import re
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

#: Unit words the toolkit removes (MathQA's units), each also with a trailing ``s``.
_UNIT_WORDS = [
    "east", "degree", "mph", "kmph", "ft", "m sqaure", " m east", "sq m", "deg", "mile", "q .", "monkey", "prime",
    "ratio", "profit of rs", "rd", "o", "gm", "p . m", "lb", "tile", "per", "dm", "lt", "gain", "ab", "way", "west",
    "a .", "b .", "c .", "d .", "e .", "f .", "g .", "h .", "t", "a", "h", "no change", "men", "soldier", "pie", "bc",
    "excess", "st", "inches", "noon", "percent", "by", "gal", "kmh", "c", "acre", "rise", "a . m", "th", "π r 2",
    "sq", "mark", "l", "toy", "coin", "sq . m", "gallon", "° f", "profit", "minw", "yr", "women", "feet", "am", "pm",
    "hr", "cu cm", "square", "v â € ™", "are", "rupee", "rounds", "cubic", "cc", "mtr", "s", "ohm", "number", "kmph",
    "day", "hour", "minute", "min", "second", "man", "woman", "sec", "cube", "mt", "sq inch", "mp", "∏ cm ³",
    "hectare", "more", "sec", "unit", "cu . m", "cm 2", "rs .", "rs", "kg", "g", "month", "km", "m", "cm", "mm",
    "apple", "liter", "loss", "yard", "pure", "year", "increase", "decrease", "d", "less", "Surface", "litre",
    "pi sq m", "s .", "metre", "meter", "inch",
]
UNIT_WORDS = tuple(_UNIT_WORDS + [word + "s" for word in _UNIT_WORDS])
_UNIT_PATTERNS = tuple(re.compile(r"(^|\W)" + word + r"($|\W)") for word in UNIT_WORDS)

#: Benchmarks graded as the toolkit's ``minerva_math``: no unit words removed, gold not normalised.
NO_UNIT_STRIPPING = frozenset({"minerva"})

RELATIVE_TOLERANCE = 1e-4
#: The toolkit gives a symbolic comparison 1 s (in a subprocess); 5 s here, so that a busy machine does
#: not turn a slow but decidable comparison into a wrong one (grades must not depend on the load).
SYMBOLIC_TIME_LIMIT_S = 5

_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
    "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9}


def words_to_number(text: str) -> str:
    """``"twenty one"`` -> ``"21"`` when every word is an English number word, else ``text``."""
    words = [w for w in re.split(r"[\s-]+", text.strip().lower()) if w and w != "and"]
    if not words or any(w not in _NUMBER_WORDS and w not in _SCALES for w in words):
        return text
    total, current = 0, 0
    for word in words:
        if word in _NUMBER_WORDS:
            current += _NUMBER_WORDS[word]
        elif word == "hundred":
            current = max(current, 1) * 100
        else:
            total += max(current, 1) * _SCALES[word]
            current = 0
    return str(total + current)


def _braced_fractions(text: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{72}`` -> ``\\frac{1}{72}`` (a ``\\frac`` already braced is kept)."""
    head, *parts = text.split("\\frac")
    out = [head]
    for part in parts:
        out.append("\\frac")
        if part.startswith("{"):
            out.append(part)
            continue
        if len(part) < 2:
            return text
        numerator, rest = part[0], part[1:]
        if rest[0] == "{":
            out.append("{" + numerator + "}" + rest)
        else:
            out.append("{" + numerator + "}{" + rest[0] + "}" + rest[1:])
    return "".join(out)


def _slash_fraction(text: str) -> str:
    """``a/b`` (one slash; each side an integer written plainly, or containing ``sqrt``) -> ``\\frac{a}{b}``."""
    sides = text.split("/")
    if len(sides) != 2:
        return text
    plain = []
    for side in sides:
        if "sqrt" in side:
            plain.append(side)
            continue
        try:
            plain.append(str(int(side)))
        except ValueError:
            return text
    if text != "/".join(plain):
        return text
    return "\\frac{" + plain[0] + "}{" + plain[1] + "}"


def strip_string(text: str, skip_unit: bool = False) -> str:
    """The toolkit's answer normalisation (``parser.strip_string``), rule by rule."""
    s = str(text).strip().replace("\n", "").rstrip(".").replace("\\!", "")
    s = re.sub(r"\\begin\{array\}\{.*?\}", r"\\begin{pmatrix}", s)
    s = re.sub(r"\\end\{array\}", r"\\end{pmatrix}", s).replace("bmatrix", "pmatrix")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\{", "{").replace("\\}", "}")
    without_unit = re.sub(r"\\text{.*?}$", "", s).strip()
    if without_unit:
        s = without_unit
    if not skip_unit:
        for _ in range(2):
            for pattern in _UNIT_PATTERNS:
                stripped = pattern.sub(r"\1\2", s)
                if stripped:
                    s = stripped
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\(", "").replace("\\)", "")
    s = words_to_number(s)
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    for prefix in ("x=", "y=", "z=", "x\\in", "y\\in", "z\\in", "x\\to", "y\\to", "z\\to"):
        s = s.replace(prefix, "")
    s = s.replace("\\emptyset", "{}").replace("(-\\infty,\\infty)", "\\mathbb{R}")
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    s = s.replace("infinity", "\\infty")
    if "\\infty" not in s:
        s = s.replace("inf", "\\infty")
    s = s.replace("+\\inity", "\\infty").replace("and", "").replace("\\mathbf", "")
    s = re.sub(r"\\mbox{.*?}", "", s)
    if "j" in s and "i" not in s:
        s = s.replace("j", "i")
    s = re.sub(r"(\d+)\.0*([^\d])", r"\1\2", s)
    s = re.sub(r"(\d+)\.0*$", r"\1", s)
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        s = sides[1]
    s = re.sub(r"\\sqrt(\w+)", r"\\sqrt{\1}", s).replace(" ", "")
    return _slash_fraction(_braced_fractions(s))


def _balanced(text: str) -> str:
    """What follows an opening ``{`` up to its matching ``}`` (all of it when unbalanced)."""
    depth, out = 1, []
    for char in text:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            break
        out.append(char)
    return "".join(out)


def extract_answer(completion: str, bench_key: str) -> str:
    """The toolkit's ``extract_answer`` for a math benchmark, normalised as it grades it."""
    text = completion.replace("\u043a\u0438", "")
    if "final answer is $" in text and "$. I hope" in text:
        answer = text.split("final answer is $", 1)[1].split("$. I hope", 1)[0].strip()
    elif "boxed" in text:
        after = text.split("boxed")[-1]
        if not after:
            return ""
        answer = _balanced(after[1:]) if after[0] == "{" else after.split("$")[0].strip()
    elif "he answer is" in text:
        answer = text.split("he answer is")[-1].strip()
    elif "final answer is" in text:
        answer = text.split("final answer is")[-1].strip()
    else:
        numbers = re.findall(r"-?\d*\.?\d+", text.replace(",", ""))
        answer = numbers[-1] if numbers else ""
    answer = re.sub(r"\n\s*", "", answer)
    if answer.startswith(":"):
        answer = answer[1:]
    if answer.endswith(".") or answer.endswith("/"):
        answer = answer[:-1]
    return strip_string(answer, skip_unit=bench_key in NO_UNIT_STRIPPING)


def predicted_answer(completion: str, bench_key: str) -> str:
    """The answer the toolkit grades: ``extract_answer``, then ``strip_string`` once more (its
    ``run_execute`` normalises the extracted answer again, so ``x \\in [-2,7]`` becomes ``[-2,7]``)."""
    return strip_string(extract_answer(completion, bench_key), skip_unit=bench_key in NO_UNIT_STRIPPING)


def gold_answer(bench_key: str, gold: str) -> str:
    """The toolkit's ``parse_ground_truth`` from the gold text this harness passes (see module doc)."""
    if bench_key in ("math_500", "minerva"):
        answer = extract_answer(gold, bench_key)
        if bench_key == "minerva":
            return answer.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
        return strip_string(answer)
    if bench_key == "olympiadbench":
        gold = gold.strip().strip("$")
    return strip_string(gold)


# ----------------------------------------------------------------------------------------------
# math_equal
# ----------------------------------------------------------------------------------------------


def parse_number(text) -> float | None:
    """A number as the toolkit reads one: commas dropped; ``50%`` / ``50\\%`` is 0.5."""
    text = str(text).replace(",", "")
    try:
        return float(text)
    except ValueError:
        pass
    if text.endswith("%"):
        text = text[:-1].rstrip("\\")
        try:
            return float(text) / 100
        except ValueError:
            return None
    return None


def numeric_equal(prediction: float, reference: float) -> bool:
    return math.isclose(reference, prediction, rel_tol=RELATIVE_TOLERANCE)


def _last_choice_letter(text: str) -> str:
    text = text.strip("\n").rstrip(".").rstrip("/").strip(" ").lstrip(":")
    letters = re.findall(r"\b(A|B|C|D|E)\b", text.upper())
    return (letters[-1] if letters else text.strip().strip(".")).rstrip(".").rstrip("/")


def _is_interval_or_tuple(text: str) -> bool:
    return re.match(r"(\(|\[).+(\)|\])", text) is not None


def _is_matrix(text: str) -> bool:
    return text.startswith(("\\begin{pmatrix}", "\\begin{bmatrix}")) and text.endswith(
        ("\\end{pmatrix}", "\\end{bmatrix}"))


def _as_pmatrix(text: str) -> str:
    rows = re.findall(r"\{.*,.*\}", text.strip())
    return ", ".join("\\begin{pmatrix}" + row.strip("{}").replace(",", "\\") + "\\end{pmatrix}" for row in rows)


def _matrix_cells(text: str) -> list[list[str]]:
    body = text[len("\\begin{pmatrix}"): -len("\\end{pmatrix}")]
    return [line.strip().split("&") for line in body.split("\\\\") if line.strip()]


def math_equal(prediction, reference, include_percentage: bool = True, is_close: bool = True) -> bool:
    """The toolkit's ``math_equal`` (see the module docstring for its rules, in order)."""
    if prediction is None or reference is None:
        return False
    prediction, reference = str(prediction), str(reference)
    if prediction.strip().lower() == reference.strip().lower():
        return True
    if reference in ("A", "B", "C", "D", "E") and _last_choice_letter(prediction) == reference:
        return True
    predicted, expected = parse_number(prediction), parse_number(reference)
    if predicted is not None and expected is not None:
        candidates = [expected / 100, expected, expected * 100] if include_percentage else [expected]
        if any(numeric_equal(predicted, c) if is_close else predicted == c for c in candidates):
            return True
    if not prediction:
        return False
    reference, prediction = reference.strip(), prediction.strip()
    if "pmatrix" in prediction and "pmatrix" not in reference:
        reference = _as_pmatrix(reference)
    pred_text, ref_text = prediction, reference
    if (pred_text[:1] + pred_text[-1:] == "[]" and ref_text[:1] + ref_text[-1:] != "()") or (
            pred_text[:1] + pred_text[-1:] == "()" and ref_text[:1] + ref_text[-1:] != "[]"):
        pred_text, ref_text = pred_text.strip("[]()"), ref_text.strip("[]()")
    pred_text, ref_text = (re.sub(r"[{}()]", "", t) for t in (pred_text, ref_text))
    if pred_text.lower() == ref_text.lower():
        return True
    if _is_interval_or_tuple(prediction) and _is_interval_or_tuple(reference):
        pred_parts, ref_parts = prediction[1:-1].split(","), reference[1:-1].split(",")
        return len(pred_parts) == len(ref_parts) and all(
            math_equal(p, r, include_percentage, is_close) for p, r in zip(pred_parts, ref_parts))
    if _is_matrix(prediction) and _is_matrix(reference):
        pred_rows, ref_rows = _matrix_cells(prediction), _matrix_cells(reference)
        return len(pred_rows) == len(ref_rows) and all(
            len(p) == len(r) and all(math_equal(a, b, include_percentage, is_close) for a, b in zip(p, r))
            for p, r in zip(pred_rows, ref_rows))
    if prediction.count("=") == 1 and reference.count("=") == 1:
        pred_eq, ref_eq = (_equation_as_difference(t) for t in (prediction, reference))
        return symbolic_equal(pred_eq, ref_eq) or symbolic_equal(f"-({pred_eq})", ref_eq)
    if _short_equation(prediction) and "=" not in reference:
        return math_equal(prediction.split("=")[1], reference, include_percentage, is_close)
    if _short_equation(reference) and "=" not in prediction:
        return math_equal(prediction, reference.split("=")[1], include_percentage, is_close)
    return symbolic_equal(prediction, reference)


def _equation_as_difference(equation: str) -> str:
    left, right = equation.split("=")
    return f"{left.strip()} - ({right.strip()})"


def _short_equation(text: str) -> bool:
    return text.count("=") == 1 and len(text.split("=")[0].strip()) <= 2


@contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """A SIGALRM limit in the main thread (the toolkit runs the comparison in a process it kills)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _parse(text: str):
    from latex2sympy2_extended import latex2sympy
    from sympy.parsing.sympy_parser import parse_expr  # both imported before the time limit starts

    for parser in (latex2sympy, parse_expr):
        for candidate in (text.replace("\\\\", "\\"), text):
            try:
                return parser(candidate)
            except Exception:
                continue
    return text


def symbolic_equal(a: str, b: str) -> bool:
    """Both parsed, then equal as text or objects, ``simplify(a - b) == 0``, equal equations, equal
    numbers within the tolerance, or equal matrices to 3 decimals; False past the time limit."""
    from latex2sympy2_extended import latex2sympy  # noqa: F401  (imported outside the time limit)
    from sympy import N, simplify

    try:
        with _time_limit(SYMBOLIC_TIME_LIMIT_S):
            x, y = _parse(a), _parse(b)
            checks = (
                lambda: str(x) == str(y) or x == y,
                lambda: x.equals(y) or simplify(x - y) == 0,
                lambda: abs(x.lhs - x.rhs).equals(abs(y.lhs - y.rhs)),
                lambda: numeric_equal(float(N(x)), float(N(y))),
                lambda: x.shape == y.shape and x.applyfunc(lambda v: round(v, 3)).equals(
                    y.applyfunc(lambda v: round(v, 3))),
            )
            for check in checks:
                try:
                    if check():
                        return True
                except TimeoutError:
                    raise
                except Exception:
                    continue
    except TimeoutError:
        return False
    return False


__all__ = ["UNIT_WORDS", "extract_answer", "gold_answer", "math_equal", "numeric_equal", "parse_number",
           "predicted_answer", "strip_string", "symbolic_equal", "words_to_number"]
