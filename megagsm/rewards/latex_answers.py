"""Reading final answers out of LaTeX-ish model output: the last ``\\boxed{...}``, and the two
normalisations the math rewards compare under.

- :func:`minerva_normalize`: the Minerva paper's ``normalize_final_answer`` (used by DAPO's reward,
  verl's ``math_dapo``): keep the text after the last ``=``, drop words such as units ("dollars",
  "cm", ...), spaces, ``$`` and ``\\text{}`` wrappers, expand ``\\fracab``, drop commas in integers.
- :func:`hendrycks_normalize`: the MATH dataset's ``strip_string`` (verl's ``math``): ``\\dfrac`` and
  ``\\tfrac`` -> ``\\frac``, no ``\\left``/``\\right``, no degrees, units after ``\\text{ ``, no ``\\%``,
  leading zeros on decimals, ``x = `` prefixes, ``\\sqrt2`` -> ``\\sqrt{2}``, ``a/b`` -> ``\\frac{a}{b}``.

Both take any string and never raise: a shape they do not know comes back unchanged (or as the caller's
"no answer").
"""
from __future__ import annotations

import re

_BOX_OPENERS = ("\\boxed{", "\\fbox{")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed x``), braces
    balanced; None when there is none or its braces never close."""
    if not isinstance(text, str):
        return None
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    if rest.startswith("\\boxed ") and not rest.startswith("\\boxed {"):
        # "\boxed 5$": up to the closing dollar sign
        return rest[len("\\boxed "):].split("$")[0].strip() or None
    brace = rest.find("{")
    if brace < 0 or rest[:brace].strip() not in ("\\boxed", "\\fbox"):
        return None
    depth = 0
    for i in range(brace, len(rest)):
        if rest[i] == "{":
            depth += 1
        elif rest[i] == "}":
            depth -= 1
            if depth == 0:
                return rest[brace + 1:i]
    return None


# ---------------------------------------------------------------------------------------- Minerva
# (before, after) replacements, then expressions removed, in this order (Minerva / lm-eval-harness).
_MINERVA_SUBSTITUTIONS = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
)
_MINERVA_REMOVED = (
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
    "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
    "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;",
    ",\\!", "{,}", '"', "\\dots",
)
_FIRST_DOLLAR_PAIR = re.compile(r"(.*?)(\$)(.*?)(\$)(.*)")
_UNWRAP = [re.compile(r"(\\" + name + r"\{)(.*?)(\})") for name in ("text", "textbf", "overline")]
_UNBOX = re.compile(r"(\\boxed\{)(.*)(\})")
_SHORT_FRAC = re.compile(r"(frac)([^{])(.)")
_SHORT_SQRT = re.compile(r"(sqrt)([^{])")


def minerva_normalize(answer: str) -> str:
    """The Minerva normalisation of a final answer (see the module docstring)."""
    text = str(answer).split("=")[-1]
    for before, after in _MINERVA_SUBSTITUTIONS:
        text = text.replace(before, after)
    for removed in _MINERVA_REMOVED:
        text = text.replace(removed, "")
    text = _FIRST_DOLLAR_PAIR.sub("$\\3$", text)  # the first $...$ of the line
    for pattern in _UNWRAP:
        text = pattern.sub("\\2", text)
    text = _UNBOX.sub("\\2", text)
    text = _SHORT_FRAC.sub("frac{\\2}{\\3}", text)  # \frac12 -> \frac{1}{2}
    text = _SHORT_SQRT.sub("sqrt{\\2}", text)        # \sqrt2 -> \sqrt{2}
    text = text.replace("$", "")
    if text.replace(",", "").isdigit():
        text = text.replace(",", "")
    return text.strip()


# ---------------------------------------------------------------------------------------- Hendrycks
def _fix_fracs(text: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{2}`` -> ``\\frac{1}{2}``; unchanged if malformed."""
    head, *parts = text.split("\\frac")
    out = head
    for part in parts:
        out += "\\frac"
        if part.startswith("{"):
            out += part
            continue
        if len(part) < 2:
            return text
        a, b, rest = part[0], part[1], part[2:]
        out += "{" + a + "}" + (b + rest if b == "{" else "{" + b + "}" + rest)
    return out


def _fix_a_slash_b(text: str) -> str:
    parts = text.split("/")
    if len(parts) != 2 or not all(re.fullmatch(r"-?[0-9]+", p) for p in parts):
        return text
    a, b = int(parts[0]), int(parts[1])
    if text != f"{a}/{b}":  # "01/2" stays as written, as in the MATH reference code
        return text
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _fix_sqrt(text: str) -> str:
    """``\\sqrt2`` -> ``\\sqrt{2}`` (the first character after each bare ``\\sqrt``)."""
    head, *parts = text.split("\\sqrt")
    out = head
    for part in parts:
        out += "\\sqrt" + (part if not part or part.startswith("{") else "{" + part[0] + "}" + part[1:])
    return out


def hendrycks_normalize(answer: str) -> str | None:
    """The MATH reference normalisation; None where the reference gives up (then compare raw text)."""
    text = str(answer).replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    text = text.replace("tfrac", "frac").replace("dfrac", "frac")
    text = text.replace("\\left", "").replace("\\right", "")
    text = text.replace("^{\\circ}", "").replace("^\\circ", "")
    text = text.replace("\\$", "")
    if "\\text{ " in text:  # units: "5 \text{ cm}" -> "5"
        parts = text.split("\\text{ ")
        if len(parts) != 2:
            return None
        text = parts[0]
    text = text.replace("\\%", "")  # an escaped percent sign (a bare "%" stays, as in the reference)
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "x = 5" -> "5"
        text = sides[1]
    text = _fix_sqrt(text).replace(" ", "")
    text = _fix_fracs(text)
    if text == "0.5":
        text = "\\frac{1}{2}"
    return _fix_a_slash_b(text)


def hendrycks_equivalent(a: str, b: str) -> bool:
    na, nb = hendrycks_normalize(a), hendrycks_normalize(b)
    if na is None or nb is None:
        return a == b
    return na == nb
