"""Generated math problems with worked answers (arithmetic, linear equations, fractions, word problems).

Deterministic from the seed; every answer is computed exactly (integers or ``fractions.Fraction``). Each problem is
a chat: ``[{"role": "user", "content": problem}, {"role": "assistant", "content": worked solution}]``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from fractions import Fraction

NAMES = [
    "Ava",
    "Ben",
    "Chloe",
    "Daniel",
    "Elena",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jonas",
    "Kemi",
    "Liam",
    "Maya",
    "Noah",
    "Olga",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tariq",
    "Uma",
    "Victor",
    "Wen",
    "Yara",
    "Zoe",
]
ITEMS = [
    ("notebook", "notebooks"),
    ("pencil", "pencils"),
    ("apple", "apples"),
    ("ticket", "tickets"),
    ("sticker", "stickers"),
    ("book", "books"),
    ("mug", "mugs"),
    ("plant", "plants"),
    ("ball", "balls"),
]


def _fmt(x: Fraction | int) -> str:
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def arithmetic(rng: random.Random) -> tuple[str, str]:
    """A three-operation expression evaluated with the order of operations, step by step."""
    a, b, c, d = (rng.randint(2, 99) for _ in range(4))
    form = rng.randrange(3)
    if form == 0:  # a + b * c - d
        bc = b * c
        steps = [
            f"Multiplication comes first: {b} × {c} = {bc}.",
            f"Then add: {a} + {bc} = {a + bc}.",
            f"Then subtract: {a + bc} - {d} = {a + bc - d}.",
        ]
        return f"Compute {a} + {b} × {c} - {d}.", _answer(steps, a + bc - d)
    if form == 1:  # (a + b) * c
        s = a + b
        steps = [f"Parentheses first: {a} + {b} = {s}.", f"Then multiply: {s} × {c} = {s * c}."]
        return f"What is ({a} + {b}) × {c}?", _answer(steps, s * c)
    q = rng.randint(2, 12)  # (b * q) ÷ q + a × d: the division is exact
    n = b * q
    steps = [
        f"Division: {n} ÷ {q} = {b}.",
        f"Multiplication: {a} × {d} = {a * d}.",
        f"Add: {b} + {a * d} = {b + a * d}.",
    ]
    return f"Evaluate {n} ÷ {q} + {a} × {d}.", _answer(steps, b + a * d)


def _lin(a: int, var: str, b: int) -> str:
    """``a var + b`` written naturally, e.g. ``7x - 5``."""
    return f"{a}{var}" + (f" + {b}" if b > 0 else f" - {-b}" if b < 0 else "")


def _p(v: int) -> str:
    return f"({v})" if v < 0 else str(v)


def linear_equation(rng: random.Random) -> tuple[str, str]:
    """``a x + b = c`` or ``a x + b = c x + d`` with an integer solution, solved and checked."""
    x = rng.randint(-20, 20)
    a = rng.choice([i for i in range(-9, 10) if i not in (-1, 0, 1)])
    b = rng.choice([i for i in range(-30, 31) if i != 0])
    var = rng.choice("xyzn")
    if rng.random() < 0.5:
        c = a * x + b
        move = f"Subtract {b} from both sides" if b > 0 else f"Add {-b} to both sides"
        steps = [
            f"{move}: {a}{var} = {c - b}.",
            f"Divide both sides by {a}: {var} = {c - b} / {_p(a)} = {x}.",
            f"Check: {a} × ({x}) {'+' if b > 0 else '-'} {abs(b)} = {c}.",
        ]
        return f"Solve for {var}: {_lin(a, var, b)} = {c}.", _answer(steps, f"{var} = {x}")
    cc = rng.choice([i for i in range(-9, 10) if i not in (0, a)])
    d = a * x + b - cc * x
    move = f"Subtract {cc}{var} from" if cc > 0 else f"Add {-cc}{var} to"
    steps = [
        f"{move} both sides: {_lin(a - cc, var, b)} = {d}.",
        f"Move the constant to the right: {a - cc}{var} = {d} - ({b}) = {d - b}.",
        f"Divide by {a - cc}: {var} = {d - b} / {_p(a - cc)} = {x}.",
        f"Check: the left side is {a * x + b} and the right side is {cc * x + d}.",
    ]
    return f"Solve for {var}: {_lin(a, var, b)} = {_lin(cc, var, d)}.", _answer(steps, f"{var} = {x}")


def fractions(rng: random.Random) -> tuple[str, str]:
    """Add, subtract, multiply or divide two fractions and simplify."""
    p, q = Fraction(rng.randint(1, 11), rng.randint(2, 12)), Fraction(rng.randint(1, 11), rng.randint(2, 12))
    op = rng.choice("+-×÷")
    if op in "+-":
        den = p.denominator * q.denominator // _gcd(p.denominator, q.denominator)
        pn, qn = p.numerator * (den // p.denominator), q.numerator * (den // q.denominator)
        result = p + q if op == "+" else p - q
        raw = pn + qn if op == "+" else pn - qn
        steps = [
            f"The least common denominator of {p.denominator} and {q.denominator} is {den}.",
            f"Rewrite: {_fmt(p)} = {pn}/{den} and {_fmt(q)} = {qn}/{den}.",
            f"Then {pn}/{den} {op} {qn}/{den} = {raw}/{den}.",
        ]
    elif op == "×":
        result, raw = p * q, f"{p.numerator * q.numerator}/{p.denominator * q.denominator}"
        steps = [
            f"Multiply numerators and denominators: ({p.numerator} × {q.numerator}) / "
            f"({p.denominator} × {q.denominator}) = {raw}."
        ]
    else:
        result, raw = p / q, f"{p.numerator * q.denominator}/{p.denominator * q.numerator}"
        steps = [
            f"Dividing by {_fmt(q)} means multiplying by its reciprocal {q.denominator}/{q.numerator}.",
            f"{_fmt(p)} × {q.denominator}/{q.numerator} = {raw}.",
        ]
    steps.append(f"In lowest terms this is {_fmt(result)}.")
    return f"Calculate {_fmt(p)} {op} {_fmt(q)} and simplify.", _answer(steps, _fmt(result))


def word_problem(rng: random.Random) -> tuple[str, str]:
    """Short everyday word problems: shopping with change, travel, equal sharing, discounts, saving."""
    name, other = rng.sample(NAMES, 2)
    one, many = rng.choice(ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        n, price = rng.randint(2, 12), rng.randint(2, 15)
        paid = (n * price // 10 + 1 + rng.randint(0, 3)) * 10
        steps = [
            f"{n} {many} at ${price} each cost {n} × {price} = ${n * price}.",
            f"The change is {paid} - {n * price} = ${paid - n * price}.",
        ]
        q = f"{name} buys {n} {many} that cost ${price} each and pays with ${paid}. How much change does {name} get?"
        return q, _answer(steps, f"${paid - n * price}")
    if kind == 1:
        speed, hours, extra = rng.randint(30, 110), rng.randint(2, 6), rng.randint(10, 90)
        steps = [
            f"Distance = speed × time = {speed} × {hours} = {speed * hours} km.",
            f"Adding the last {extra} km gives {speed * hours} + {extra} = {speed * hours + extra} km.",
        ]
        q = (
            f"{name} drives at {speed} km/h for {hours} hours and then walks the last {extra} km. "
            f"How many kilometres does {name} travel in total?"
        )
        return q, _answer(steps, f"{speed * hours + extra} km")
    if kind == 2:
        friends, each, left = rng.randint(2, 9), rng.randint(2, 12), rng.randint(0, 5)
        left = min(left, friends - 1)
        total = friends * each + left
        steps = [
            f"Divide {total} {many} among {friends} friends: {total} ÷ {friends} = {each} remainder {left}.",
            f"So each friend gets {each} {many if each != 1 else one} and {left} are left over.",
        ]
        q = (
            f"{name} shares {total} {many} equally among {friends} friends. "
            "How many does each friend get, and how many are left?"
        )
        return q, _answer(steps, f"{each} each, {left} left over")
    if kind == 3:
        price, pct = rng.randint(2, 40) * 5, rng.choice([10, 15, 20, 25, 30, 40, 50])
        off = Fraction(price * pct, 100)
        steps = [
            f"The discount is {pct}% of ${price} = {pct}/100 × {price} = ${_fmt(off)}.",
            f"The sale price is {price} - {_fmt(off)} = ${_fmt(price - off)}.",
        ]
        q = f"A {one} costs ${price}. {name} gets a {pct}% discount. What does {name} pay?"
        return q, _answer(steps, f"${_fmt(price - off)}")
    start, weekly, goal = rng.randint(0, 50), rng.randint(5, 25), rng.randint(100, 400)
    weeks = -(-(goal - start) // weekly)
    steps = [
        f"{name} still needs {goal} - {start} = ${goal - start}.",
        f"At ${weekly} a week that takes {goal - start} ÷ {weekly} ≈ {(goal - start) / weekly:.2f} weeks, "
        f"so {weeks} full weeks (after {weeks - 1} weeks {name} has ${start + (weeks - 1) * weekly}, "
        f"after {weeks} weeks ${start + weeks * weekly}).",
    ]
    q = (
        f"{name} has ${start} and saves ${weekly} every week to buy a gift for {other} that costs ${goal}. "
        f"After how many weeks can {name} buy it?"
    )
    return q, _answer(steps, f"{weeks} weeks")


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _answer(steps: list[str], result: object) -> str:
    return "\n".join(steps) + f"\nThe answer is {result}."


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": arithmetic,
    "linear_equation": linear_equation,
    "fractions": fractions,
    "word_problem": word_problem,
}


def math_problems(seed: int = 0) -> Iterator[dict[str, object]]:
    """An endless, seed-deterministic stream of ``{"messages": [...], "kind": ...}`` math records."""
    rng = random.Random(seed)
    kinds = list(GENERATORS)
    while True:
        kind = rng.choice(kinds)
        question, answer = GENERATORS[kind](rng)
        yield {
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "kind": kind,
        }
