"""Teacher-recovery metrics of the paper (section 3 of docs/evaluation.md).

Scores are ``{benchmark: accuracy}`` mappings (higher is better, non-negative; any scale, e.g. 0-1 or 0-100, as
long as student and teacher use the same one). For benchmarks ``B = {b_1 .. b_n}``:

- teacher-recovery rate ``r(b) = A_S(b) / A_T(b)`` (> 1: the student is better);
- Win-and-Tie rate ``C_alpha = (1/n) * #{b : A_S(b) >= (1 - alpha) * A_T(b)}`` for a relative tolerance
  ``alpha`` in [0, 1];
- critical tolerance ``alpha* = inf{alpha in [0, 1] : C_alpha >= threshold}`` (threshold 0.5 in the paper;
  ``C_0 >= 0.5`` means "lossless").

``alpha*`` is computed exactly: for ``A_T(b) > 0`` the condition ``A_S >= (1 - alpha) A_T`` is equivalent to
``alpha >= t(b)`` with the break-even tolerance ``t(b) = 1 - A_S(b) / A_T(b)``, clipped to [0, 1]. Hence
``C_alpha = #{b : t(b) <= alpha} / n`` is a right-continuous step function and ``alpha*`` is the k-th smallest
``t(b)`` where k is the smallest count with ``k / n >= threshold``.

Floating point: break-even tolerances are rounded to 12 decimals and comparisons allow ``1e-9`` of slack, so that
scores written as decimals behave as on paper (0.99 against 1.0 ties at alpha = 0.01, not at 0.0100000000000009).

Teacher score zero (``A_T(b) = 0``): the recovery rate is undefined. ``zero_teacher`` chooses what happens:

- ``"error"`` (default): raise ``ValueError`` naming the benchmarks;
- ``"skip"``: drop those benchmarks (``n`` shrinks);
- ``"win"``: apply the definition literally: ``A_S >= (1 - alpha) * 0`` holds for every alpha (scores are
  non-negative), so the benchmark counts as won at every tolerance (break-even tolerance 0); its recovery rate is
  ``inf`` (``nan`` when the student also scores 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

Scores = Mapping[str, float]
ZeroTeacher = Literal["error", "skip", "win"]

EPS = 1e-9
_DECIMALS = 12

__all__ = [
    "break_even_tolerances",
    "critical_tolerance",
    "paired_kl_difference",
    "recovery_rates",
    "summarize",
    "win_and_tie",
    "win_and_tie_curve",
]


def _validated(student: Scores, teacher: Scores, zero_teacher: ZeroTeacher) -> list[tuple[str, float, float]]:
    """Check the two score sets and return ``(benchmark, A_S, A_T)`` for the benchmarks that take part."""
    if zero_teacher not in ("error", "skip", "win"):
        raise ValueError(f"zero_teacher must be 'error', 'skip' or 'win', not {zero_teacher!r}")
    if not teacher:
        raise ValueError("No benchmarks: the teacher score mapping is empty.")
    s_keys, t_keys = set(student), set(teacher)
    if s_keys != t_keys:
        parts = []
        if t_keys - s_keys:
            parts.append(f"missing from the student scores: {sorted(t_keys - s_keys)}")
        if s_keys - t_keys:
            parts.append(f"missing from the teacher scores: {sorted(s_keys - t_keys)}")
        raise ValueError("Student and teacher must be scored on the same benchmarks; " + "; ".join(parts))
    rows = []
    for name in teacher:  # teacher order
        a_s, a_t = student[name], teacher[name]
        for who, value in (("student", a_s), ("teacher", a_t)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"The {who} score on '{name}' must be a finite number, not {value!r}.")
            if value < 0:
                raise ValueError(f"The {who} score on '{name}' is negative ({value}); scores must be accuracies >= 0.")
        rows.append((name, float(a_s), float(a_t)))
    zero = [name for name, _, a_t in rows if a_t == 0]
    if zero and zero_teacher == "error":
        raise ValueError(
            f"The teacher scores 0 on {zero}: the recovery rate A_S/A_T is undefined there. Pass "
            "zero_teacher='skip' to leave those benchmarks out, or zero_teacher='win' to apply the definition "
            "literally (A_S >= (1 - alpha) * 0 always holds, so they count as won at every tolerance)."
        )
    if zero_teacher == "skip":
        rows = [row for row in rows if row[2] != 0]
        if not rows:
            raise ValueError("No benchmarks left: the teacher scores 0 on all of them.")
    return rows


def recovery_rates(student: Scores, teacher: Scores, zero_teacher: ZeroTeacher = "error") -> dict[str, float]:
    """Teacher-recovery rate ``A_S(b) / A_T(b)`` per benchmark (teacher's benchmark order)."""
    rates = {}
    for name, a_s, a_t in _validated(student, teacher, zero_teacher):
        if a_t == 0:  # only reached with zero_teacher="win"
            rates[name] = math.inf if a_s > 0 else math.nan
        else:
            rates[name] = a_s / a_t
    return rates


def break_even_tolerances(
    student: Scores, teacher: Scores, zero_teacher: ZeroTeacher = "error"
) -> dict[str, float]:
    """Smallest tolerance at which each benchmark counts as won: ``clip(1 - A_S/A_T, 0, 1)``."""
    out = {}
    for name, a_s, a_t in _validated(student, teacher, zero_teacher):
        t = 0.0 if a_t == 0 else min(max(1.0 - a_s / a_t, 0.0), 1.0)
        out[name] = round(t, _DECIMALS)
    return out


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"The tolerance alpha must be a number in [0, 1], not {alpha!r}.")
    return float(alpha)


def win_and_tie(student: Scores, teacher: Scores, alpha: float = 0.0, zero_teacher: ZeroTeacher = "error") -> float:
    """Win-and-Tie rate ``C_alpha``: fraction of benchmarks with ``A_S >= (1 - alpha) * A_T``."""
    alpha = _check_alpha(alpha)
    tolerances = break_even_tolerances(student, teacher, zero_teacher)
    wins = sum(1 for t in tolerances.values() if t <= alpha + EPS)
    return wins / len(tolerances)


def critical_tolerance(
    student: Scores, teacher: Scores, threshold: float = 0.5, zero_teacher: ZeroTeacher = "error"
) -> float:
    """Critical tolerance ``alpha* = inf{alpha in [0, 1] : C_alpha >= threshold}`` (exact, no grid).

    Lower is better; 0 means the student is lossless at this threshold (``C_0 >= threshold``). With
    ``threshold = 1`` it is the largest break-even tolerance (every benchmark won).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a number in [0, 1], not {threshold!r}.")
    tolerances = sorted(break_even_tolerances(student, teacher, zero_teacher).values())
    n = len(tolerances)
    # Smallest k with k / n >= threshold (same comparison as win_and_tie's C_alpha = wins / n).
    k = next(k for k in range(n + 1) if k / n >= threshold)
    return 0.0 if k == 0 else tolerances[k - 1]


def win_and_tie_curve(
    student: Scores, teacher: Scores, zero_teacher: ZeroTeacher = "error"
) -> tuple[list[float], list[float]]:
    """Exact step function ``alpha -> C_alpha`` on [0, 1]: breakpoints ``alphas`` (starting at 0, ending at 1)
    and ``C_alpha`` from each breakpoint up to the next one (plot with ``step(..., where="post")``)."""
    tolerances = break_even_tolerances(student, teacher, zero_teacher)
    n = len(tolerances)
    alphas = sorted({0.0, 1.0, *tolerances.values()})
    values = [sum(1 for t in tolerances.values() if t <= a + EPS) / n for a in alphas]
    return alphas, values


def summarize(
    student: Scores,
    teacher: Scores,
    alphas: tuple[float, ...] = (0.0, 0.01, 0.05),
    threshold: float = 0.5,
    zero_teacher: ZeroTeacher = "error",
) -> dict:
    """Recovery rates, ``C_alpha`` at the given tolerances and ``alpha*`` in one JSON-friendly dict."""
    rates = recovery_rates(student, teacher, zero_teacher)
    finite = [r for r in rates.values() if math.isfinite(r)]
    return {
        "benchmarks": list(rates),
        "recovery": rates,
        "mean_recovery": sum(finite) / len(finite) if finite else math.nan,
        "win_and_tie": {f"{a:g}": win_and_tie(student, teacher, a, zero_teacher) for a in alphas},
        "critical_tolerance": critical_tolerance(student, teacher, threshold, zero_teacher),
        "threshold": threshold,
    }


def paired_difference(student: Mapping[str, float], teacher: Mapping[str, float]) -> dict[str, float] | None:
    """Mean per-document difference ``student - teacher`` over the documents both scored, with its standard error
    ``sd(d) / sqrt(n)``. Paired on the same documents, it is far smaller than the two scores' own standard errors
    when the models agree on most documents. None with fewer than two common documents."""
    common = sorted(set(student) & set(teacher))
    n = len(common)
    if n < 2:
        return None
    d = [student[k] - teacher[k] for k in common]
    mean = sum(d) / n
    variance = sum((x - mean) ** 2 for x in d) / (n - 1)
    return {"difference": mean, "stderr": math.sqrt(variance / n), "documents": n}


def mean_paired_difference(per_task: Mapping[str, Mapping[str, float]]) -> dict[str, float] | None:
    """The tasks' paired differences averaged with equal weight (as mean recovery weighs them), with the standard
    error ``sqrt(sum se_i^2) / n`` (the tasks' documents are distinct, so their errors are independent). None
    without tasks."""
    n = len(per_task)
    if n == 0:
        return None
    mean = sum(p["difference"] for p in per_task.values()) / n
    stderr = math.sqrt(sum(p["stderr"] ** 2 for p in per_task.values())) / n
    return {"difference": mean, "stderr": stderr, "tasks": n}


def paired_kl_difference(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]]) -> dict[str, float] | None:
    """Held-out KL of model ``a`` minus model ``b`` on the same sequences, with its standard error.

    ``a`` and ``b``: ``{"sum": [per-sequence KL summed over its tokens], "tokens": [its token count]}`` (one part of
    ``compare_to_teacher``'s ``per_sequence``). The difference is the pooled one, ``(sum a - sum b) / tokens``, exactly
    the difference of the two reported KLs; its standard error treats each sequence as a cluster of tokens (the
    linearized ratio estimator): ``sqrt(m / (m - 1) * sum_i (d_i - D n_i)^2) / N`` with ``d_i`` the sequence's
    summed difference, ``n_i`` its tokens, ``m`` sequences with tokens and ``N`` all tokens. Paired on the same
    sequences, it is far smaller than either KL's own spread. None with fewer than two such sequences."""
    if list(a["tokens"]) != list(b["tokens"]):
        raise ValueError("paired_kl_difference needs both models measured on the same held-out sequences (their token "
                         "counts differ): compare results of one report, or reports with the same data settings.")
    rows = [(sa - sb, n) for sa, sb, n in zip(a["sum"], b["sum"], a["tokens"]) if n > 0]
    total = sum(n for _, n in rows)
    if len(rows) < 2:
        return None
    mean = sum(d for d, _ in rows) / total
    m = len(rows)
    variance = m / (m - 1) * sum((d - mean * n) ** 2 for d, n in rows)
    return {"difference": mean, "stderr": math.sqrt(variance) / total, "sequences": m}
