"""Raven-style progressive matrices, generated from the rules and rendered with PIL.

A puzzle is a 3x3 grid of panels with the last one missing. Each panel holds identical shapes placed
on a 3x3 grid of slots; four attributes vary over the grid:
- layout: the number of shapes, or the set of occupied slots (one of the two carries a rule);
- shape (triangle, square, pentagon, hexagon, circle), size (the drawn radius, 3 to 9 tenths of half
  a slot) and colour (darkness 0 = white to 9 = black, in equal grey steps).
Each attribute follows one rule along every row: constant, progression (+-1 or +-2 per column),
arithmetic (third = first + second, or first - second, on the drawn radii and grey levels; union or
difference of slot sets) or distribute-three (three values, each row a cyclic shift of the first, so
every column holds them all).

The candidates are made before the context, so that nothing about them can point to the answer: the
number of candidates is split into prime factors, each factor goes to its own attribute (layout, size
or colour), that attribute gets that many values (far enough apart to tell at sight), and the
candidates are all combinations of those values. The answer is one of them drawn uniformly, and the
context is drawn until its rules lead to the answer's values and to none of the other candidates'
values. Every candidate set is thus as likely under each choice of answer, so any function of the
candidates alone finds the answer at chance rate, and exactly one candidate is explained by the rules
(checked for every puzzle).

Counting the context is no shortcut either: in an attribute where the candidates differ, the context
shows every candidate's value exactly as often as the answer's (a slot set also by its number of
shapes). Rows with that property are drawn for every candidate value before the answer is chosen, and a
candidate set for which some value gets none is drawn again, so keeping a candidate set says nothing
about the answer. Constant and distribute-three rows never have the property (their last value
appears 2, 5 or 8 times, any other a multiple of three), so the attributes in which the candidates
differ follow progressions or arithmetic, and the others any rule.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("triangle", "square", "pentagon", "hexagon", "circle")
NUM_COLOURS = 10  # darkness 0 is white, 9 black
SLOTS = 9
RULES = ("constant", "progression", "arithmetic", "distribute_three")
# Arithmetic over shape kinds has no meaning, so shapes never get that rule.
SHAPE_RULES = ("constant", "progression", "distribute_three")
ATTRIBUTES = ("layout", "shape", "size", "colour")
VALUE_RANGES = {
    "number": (1, SLOTS),
    "shape": (0, len(SHAPES) - 1),
    "size": (3, 9),  # radius in tenths of half a slot, so that sizes add as drawn
    "colour": (0, NUM_COLOURS - 1),
}
# The least difference between two candidates' values of an attribute: two size steps are 1/5 of a
# slot's radius, two grey steps 57 of 255 levels, both plain at the default 160-pixel panels.
MIN_GAP = {"number": 1, "shape": 1, "size": 2, "colour": 2}
# The attributes in which candidates may differ, and how many values far enough apart each can give
# them (a layout: numbers, or slot sets that each toggle one slot of a common set), so few that a
# context can show all of them equally often. Shapes, with five kinds and no arithmetic, seldom can:
# all candidates of a puzzle share one shape.
CAPACITY = {"layout": 5, "size": 3, "colour": 5}
DEFAULT_CANDIDATES = 6
COUNT_WORDS = {3: "three", 4: "four", 8: "eight"}
MAX_CONTEXT_DRAWS = 10_000
BALANCE_DRAWS = 2_000


@dataclass(frozen=True)
class Panel:
    positions: tuple[int, ...]  # occupied slots, row-major in the panel's 3x3 grid, sorted
    shape: int
    size: int
    colour: int

    @property
    def number(self) -> int:
        return len(self.positions)


@dataclass
class RavenPuzzle:
    context: list[Panel]  # the eight given panels, row-major
    candidates: list[Panel]
    answer: int
    rules: dict[str, str]  # attribute -> rule, e.g. {"layout": "number progression +1", ...}


# --- rule checks ---------------------------------------------------------------------------------------

Matrix = list[list]


def _is_latin(rows: Matrix) -> bool:
    """Distribute-three: three distinct values, the same in every row, all three in every column."""
    values = set(rows[0])
    return (
        len(values) == 3
        and all(set(r) == values for r in rows)
        and all(len({r[c] for r in rows}) == 3 for c in range(3))
    )


def values_explained(rows: Matrix, rules: Sequence[str] = RULES) -> bool:
    """Whether some rule (with any parameter) holds along all three rows of integer values."""
    if "constant" in rules and all(r[0] == r[1] == r[2] for r in rows):
        return True
    if "progression" in rules:
        steps = {r[1] - r[0] for r in rows} | {r[2] - r[1] for r in rows}
        if len(steps) == 1 and steps != {0}:
            return True
    if "arithmetic" in rules and (
        all(r[2] == r[0] + r[1] for r in rows) or all(r[2] == r[0] - r[1] for r in rows)
    ):
        return True
    return "distribute_three" in rules and _is_latin(rows)


def _shifted(slots: frozenset[int], step: int) -> frozenset[int]:
    return frozenset((s + step) % SLOTS for s in slots)


def positions_explained(rows: list[list[frozenset[int]]]) -> bool:
    """Whether some rule holds along all rows of slot sets (shift, union, difference, permutation)."""
    if all(r[0] == r[1] == r[2] for r in rows):
        return True
    for step in (-2, -1, 1, 2):
        if all(r[1] == _shifted(r[0], step) and r[2] == _shifted(r[1], step) for r in rows):
            return True
    if all(r[2] == r[0] | r[1] for r in rows) or all(r[2] == r[0] - r[1] for r in rows):
        return True
    return _is_latin(rows)


def _layout_explained(rows: list[list[frozenset[int]]]) -> bool:
    """The layout is explained by a rule on the positions or on the number of shapes."""
    return positions_explained(rows) or values_explained([[len(s) for s in r] for r in rows])


def candidate_is_correct(context: Sequence[Panel], candidate: Panel) -> bool:
    """Whether some rule of the family explains every attribute once `candidate` completes the grid.

    Any rule with any parameter counts (not only the one the puzzle was made with), and the layout
    counts as explained by a rule on either the number or the positions of the shapes.
    """
    panels = list(context) + [candidate]
    rows = [panels[3 * r : 3 * r + 3] for r in range(3)]
    if not values_explained([[p.shape for p in row] for row in rows], SHAPE_RULES):
        return False
    for name in ("size", "colour"):
        if not values_explained([[getattr(p, name) for p in row] for row in rows]):
            return False
    return _layout_explained([[frozenset(p.positions) for p in row] for row in rows])


# --- context rows that end in a given value ------------------------------------------------------------


def _random_slots(count: int, rng: random.Random) -> frozenset[int]:
    return frozenset(rng.sample(range(SLOTS), count))


def _latin_rows(target, others: Sequence, rng: random.Random) -> Matrix:
    """Distribute-three rows over `target` and two of `others`, with `target` in the last cell."""
    shift = rng.choice((1, 2))
    first = rng.sample(list(others), 2)
    # Row r, column c holds first[(c + r * shift) % 3], so the last cell holds first[(2 + 2 * shift) % 3].
    first.insert((2 + 2 * shift) % 3, target)
    return [first[(r * shift) % 3 :] + first[: (r * shift) % 3] for r in range(3)]


@functools.cache
def _arithmetic_pairs(lo: int, hi: int, plus: bool) -> tuple[tuple[int, int], ...]:
    """Operand pairs in [lo, hi] whose sum (or difference) is in [lo, hi] too. The second operand is
    at least 1 so the rule never degenerates into a constant."""
    return tuple(
        (a, b)
        for a in range(lo, hi + 1)
        for b in range(max(lo, 1), hi + 1)
        if lo <= (a + b if plus else a - b) <= hi
    )


def _value_rows(rule: str, attribute: str, target: int, rng: random.Random) -> tuple[Matrix, str] | None:
    """Three rows of integer values following `rule` whose last value is `target`; None if it cannot."""
    lo, hi = VALUE_RANGES[attribute]
    if rule == "constant":
        return [[c] * 3 for c in (rng.randint(lo, hi), rng.randint(lo, hi), target)], "constant"
    if rule == "progression":
        steps = [s for s in (-2, -1, 1, 2) if lo <= target - 2 * s <= hi]
        if not steps:
            return None
        step = rng.choice(steps)
        starts = [a for a in range(lo, hi + 1) if lo <= a + 2 * step <= hi]
        firsts = [rng.choice(starts), rng.choice(starts), target - 2 * step]
        return [[a, a + step, a + 2 * step] for a in firsts], f"progression {step:+d}"
    if rule == "arithmetic":
        plus = rng.random() < 0.5

        def result(a: int, b: int) -> int:
            return a + b if plus else a - b

        pairs = _arithmetic_pairs(lo, hi, plus)
        ending = [p for p in pairs if result(*p) == target]
        if not ending:
            return None
        rows = [[a, b, result(a, b)] for a, b in (rng.choice(pairs), rng.choice(pairs), rng.choice(ending))]
        return rows, "arithmetic " + ("plus" if plus else "minus")
    return _latin_rows(target, [v for v in range(lo, hi + 1) if v != target], rng), "distribute_three"


def _union_parts(target: frozenset[int], rng: random.Random) -> tuple[frozenset[int], frozenset[int]]:
    """Two sets whose union is `target`, each holding something the other lacks (|target| >= 2)."""
    while True:
        # Each slot goes to the first set, the second or both.
        sides = {s: rng.randrange(3) for s in target}
        a = frozenset(s for s, side in sides.items() if side != 1)
        b = frozenset(s for s, side in sides.items() if side != 0)
        if a != target and b != target:
            return a, b


def _difference_parts(target: frozenset[int], rng: random.Random) -> tuple[frozenset[int], frozenset[int]]:
    """a, b with a - b == target and b taking something away from a (target not all slots)."""
    outside = [s for s in range(SLOTS) if s not in target]
    removed = frozenset(rng.sample(outside, rng.randint(1, len(outside))))
    taken = frozenset(rng.sample(sorted(removed), rng.randint(1, len(removed))))
    return target | taken, removed


def _position_rows(
    rule: str, target: frozenset[int], candidates: Sequence[frozenset[int]], rng: random.Random
) -> tuple[Matrix, str] | None:
    """Three rows of slot sets following `rule` whose last set is `target`; None if it cannot. The
    first two rows draw half their free sets from the `candidates`, so that slot sets of wrong
    candidates are seen in the context too."""

    def free(least: int = 1, most: int = SLOTS) -> frozenset[int]:
        fitting = [c for c in candidates if least <= len(c) <= most]
        if fitting and rng.random() < 0.5:
            return rng.choice(fitting)
        return _random_slots(rng.randint(least, most), rng)

    if rule == "constant":
        return [[s] * 3 for s in (free(), free(), target)], "constant"
    if rule == "progression":
        step = rng.choice((-2, -1, 1, 2))
        if _shifted(target, step) == target:  # all nine slots: a shift would change nothing
            return None
        firsts = [free(most=SLOTS - 1), free(most=SLOTS - 1), _shifted(target, -2 * step)]
        return [[f, _shifted(f, step), _shifted(f, 2 * step)] for f in firsts], f"progression {step:+d}"
    if rule == "arithmetic":
        union = rng.random() < 0.5
        if len(target) < 2 if union else len(target) == SLOTS:
            return None
        parts = _union_parts if union else _difference_parts
        counts = (2, SLOTS) if union else (1, SLOTS - 1)
        results = [free(*counts), free(*counts), target]
        return [[*parts(c, rng), c] for c in results], "arithmetic " + ("union" if union else "difference")
    distinct = [target]
    while len(distinct) < 3:
        slots = free()
        if slots not in distinct:
            distinct.append(slots)
    return _latin_rows(target, distinct[1:], rng), "distribute_three"


def _seen(rows: Matrix, value) -> tuple[int, ...]:
    """How often the context (all cells but the last) shows `value`; a slot set also by how many
    panels have as many shapes, as a solver counting the context would see it."""
    cells = [cell for row in rows for cell in row][:8]
    if isinstance(value, frozenset):
        return sum(cell == value for cell in cells), sum(len(cell) == len(value) for cell in cells)
    return (cells.count(value),)


def _draw_rows(
    attribute: str, layout_on: str, target, values: Sequence, rng: random.Random, rules: Sequence[str] = RULES
) -> tuple[Matrix, str] | None:
    """Rows under a rule drawn from `rules` that end in `target`; None if that rule cannot. `values`
    are the candidates' values (slot sets of other candidates are shown in position layouts)."""
    if attribute == "layout" and layout_on == "position":
        return _position_rows(rng.choice(rules), target, values, rng)
    if attribute == "shape":
        rules = [r for r in rules if r in SHAPE_RULES]
    return _value_rows(rng.choice(rules), "number" if attribute == "layout" else attribute, target, rng)


def _completes_another(attribute: str, layout_on: str, rows: Matrix, others: Sequence) -> bool:
    """Whether some rule also explains the rows with one of `others` in the last cell."""
    if attribute == "layout" and layout_on == "position":
        explained: Callable[[Matrix], bool] = _layout_explained
    else:
        explained = functools.partial(values_explained, rules=SHAPE_RULES if attribute == "shape" else RULES)
    return any(explained(rows[:2] + [rows[2][:2] + [other]]) for other in others)


def _any_rows(attribute: str, layout_on: str, target, rng: random.Random) -> tuple[Matrix, str]:
    """Rows under a random rule that end in `target` (an attribute all candidates share)."""
    for _ in range(MAX_CONTEXT_DRAWS):
        made = _draw_rows(attribute, layout_on, target, [target], rng)
        if made is not None:
            return made
    raise RuntimeError(f"no context rows for {attribute} ending in {target}")


# Constant and distribute-three rows show their last value 2, 5 or 8 times in the context and any other
# value a multiple of three times, so they never show two candidates' values equally often.
BALANCED_RULES = ("progression", "arithmetic")


def _balanced_rows(attribute: str, layout_on: str, values: Sequence, rng: random.Random) -> dict | None:
    """For every one of `values`, rows that end in it, that no rule completes with another of
    `values`, and that show each of `values` equally often; None if some value gets no such rows in
    `BALANCE_DRAWS` draws. The rows are drawn for every value before the answer is chosen, so
    whether a candidate set is kept says nothing about which candidate is the answer."""
    found = {}
    for target in values:
        others = [v for v in values if v != target]
        for _ in range(BALANCE_DRAWS):
            made = _draw_rows(attribute, layout_on, target, values, rng, BALANCED_RULES)
            if (
                made is not None
                and len({_seen(made[0], v) for v in values}) == 1
                and not _completes_another(attribute, layout_on, made[0], others)
            ):
                found[target] = made
                break
        else:
            return None
    return found


def _context(
    answer: tuple, varied_rows: dict[str, dict], layout_on: str, rng: random.Random
) -> tuple[list[Panel], dict[str, str]]:
    """Eight context panels whose rules lead to the `answer` values: those of the attributes in which
    the candidates differ come from `varied_rows`, the others are drawn here."""
    grids, rules = {}, {}
    for attribute, target in zip(ATTRIBUTES, answer):
        if attribute in varied_rows:
            grids[attribute], rules[attribute] = varied_rows[attribute][target]
        else:
            grids[attribute], rules[attribute] = _any_rows(attribute, layout_on, target, rng)
    rules["layout"] = f"{layout_on} {rules['layout']}"
    context = []
    for r, c in itertools.product(range(3), range(3)):
        layout, shape, size, colour = (grids[a][r][c] for a in ATTRIBUTES)
        slots = _random_slots(layout, rng) if layout_on == "number" else layout
        context.append(Panel(tuple(sorted(slots)), shape, size, colour))
    return context[:8], rules


# --- candidates and puzzles ------------------------------------------------------------------------------


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return factors


def check_candidate_count(count: int) -> None:
    """Raise ValueError unless `count` candidates can be made: each prime factor of the count needs an
    attribute of its own with that many values (layout 9, shape 5, size 4, colour 5)."""
    factors = sorted(_prime_factors(count), reverse=True)
    capacities = sorted(CAPACITY.values(), reverse=True)
    if count < 2 or len(factors) > len(capacities) or any(f > c for f, c in zip(factors, capacities)):
        raise ValueError(
            f"{count} candidates cannot be made: the count must be at least 2 and its prime factors "
            f"must go to distinct attributes with that many values ({CAPACITY})"
        )


def _varied_attributes(count: int, rng: random.Random) -> dict[str, int]:
    """The attributes in which the candidates differ, each with its number of values (product: count)."""
    check_candidate_count(count)
    varied: dict[str, int] = {}
    for factor in sorted(_prime_factors(count), reverse=True):
        free = [a for a in CAPACITY if a not in varied and CAPACITY[a] >= factor]
        varied[rng.choice(free)] = factor
    return varied


def _candidate_values(attribute: str, count: int, layout_on: str, rng: random.Random) -> list:
    """`count` values of `attribute`, drawn without regard to which will be the answer's."""
    if attribute == "layout" and layout_on == "position":
        while True:
            base = _random_slots(rng.randint(1, SLOTS), rng)
            toggled = [base ^ {s} for s in rng.sample(range(SLOTS), SLOTS)]
            sets = [s for s in toggled if s]
            if len(sets) >= count:
                return sets[:count]
    name = "number" if attribute == "layout" else attribute
    lo, hi = VALUE_RANGES[name]
    while True:
        values = sorted(rng.sample(range(lo, hi + 1), count))
        if all(b - a >= MIN_GAP[name] for a, b in itertools.pairwise(values)):
            return values


def make_puzzle(rng: random.Random, num_candidates: int = DEFAULT_CANDIDATES) -> RavenPuzzle:
    """One puzzle with `num_candidates` candidates of which exactly one is correct."""
    layout_on = rng.choice(("number", "position"))
    varied = _varied_attributes(num_candidates, rng)
    for _ in range(MAX_CONTEXT_DRAWS):
        values = {a: _candidate_values(a, varied.get(a, 1), layout_on, rng) for a in ATTRIBUTES}
        varied_rows = {}
        for attribute in varied:
            rows = _balanced_rows(attribute, layout_on, values[attribute], rng)
            if rows is None:
                break
            varied_rows[attribute] = rows
        else:
            break
    else:
        raise RuntimeError(f"no candidate set of {num_candidates} that a context can show equally often")
    # A number layout leaves the slots free: candidates with the same number share them.
    slots = {v: _random_slots(v, rng) if layout_on == "number" else v for v in values["layout"]}
    combinations = list(itertools.product(*(values[a] for a in ATTRIBUTES)))
    rng.shuffle(combinations)
    candidates = [
        Panel(tuple(sorted(slots[layout])), shape, size, colour)
        for layout, shape, size, colour in combinations
    ]
    answer = rng.randrange(len(candidates))
    for _ in range(MAX_CONTEXT_DRAWS):
        context, rules = _context(combinations[answer], varied_rows, layout_on, rng)
        correct = [candidate_is_correct(context, c) for c in candidates]
        # The slots of a number layout's context may happen to follow a position rule: draw again.
        if correct.count(True) == 1 and correct[answer]:
            return RavenPuzzle(context, candidates, answer, rules)
    raise RuntimeError("no context with exactly one correct candidate")


def generate_puzzles(count: int, seed: int, num_candidates: int = DEFAULT_CANDIDATES) -> list[RavenPuzzle]:
    rng = random.Random(seed)
    return [make_puzzle(rng, num_candidates) for _ in range(count)]


# --- baselines: what a score means ------------------------------------------------------------------------


def _value_keys(panel: Panel) -> tuple:
    return (
        ("number", panel.number),
        ("positions", panel.positions),
        ("shape", panel.shape),
        ("size", panel.size),
        ("colour", panel.colour),
    )


def _most_seen(candidates: Sequence[Panel], seen: Counter) -> int:
    """The candidate whose attribute values are the most frequent in `seen` (the first one on ties)."""
    scores = [sum(seen[key] for key in _value_keys(c)) for c in candidates]
    return scores.index(max(scores))


def most_common_values_choice(context: Sequence[Panel], candidates: Sequence[Panel]) -> int:
    """Never reads the context: the candidate sharing the most values with the other candidates
    (the shortcut that solves the original RAVEN)."""
    return _most_seen(candidates, Counter(key for c in candidates for key in _value_keys(c)))


def context_copy_choice(context: Sequence[Panel], candidates: Sequence[Panel]) -> int:
    """Infers no rule: the candidate whose attribute values appear the most in the context panels."""
    return _most_seen(candidates, Counter(key for p in context for key in _value_keys(p)))


def context_count_choice(context: Sequence[Panel], candidates: Sequence[Panel]) -> int:
    """Infers no rule: the candidate with the most attribute values that the context shows 2, 5 or 8
    times, as constant and distribute-three rows show the value that completes them."""
    seen = Counter(key for p in context for key in _value_keys(p))
    scores = [sum(seen[key] % 3 == 2 for key in _value_keys(c)) for c in candidates]
    return scores.index(max(scores))


BASELINES: dict[str, Callable[[Sequence[Panel], Sequence[Panel]], int]] = {
    "candidates_only": most_common_values_choice,
    "context_copy": context_copy_choice,
    "context_count": context_count_choice,
}


def baseline_choices(puzzle: RavenPuzzle) -> dict[str, int]:
    return {name: choose(puzzle.context, puzzle.candidates) for name, choose in BASELINES.items()}


# --- rendering and files --------------------------------------------------------------------------------


def _polygon(cx: float, cy: float, radius: float, sides: int) -> list[tuple[float, float]]:
    # Odd polygons point up; even ones sit on a flat side (a square, not a diamond).
    turn = math.pi / sides if sides % 2 == 0 else 0.0
    return [
        (
            cx + radius * math.sin(2 * math.pi * k / sides + turn),
            cy - radius * math.cos(2 * math.pi * k / sides + turn),
        )
        for k in range(sides)
    ]


def render_panel(panel: Panel, size: int = 160) -> Image.Image:
    """The panel as a white RGB image with a black frame; shapes filled grey, outlined black."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, size - 1, size - 1], outline="black", width=max(1, size // 80))
    # Thin outlines leave the smallest shapes' grey plain to see.
    line = max(1, size // 160)
    margin = size * 0.05
    slot = (size - 2 * margin) / 3
    grey = round(255 * (1 - panel.colour / (NUM_COLOURS - 1)))
    radius = panel.size / 10 * slot / 2
    for position in panel.positions:
        row, col = divmod(position, 3)
        cx, cy = margin + (col + 0.5) * slot, margin + (row + 0.5) * slot
        fill = (grey, grey, grey)
        if SHAPES[panel.shape] == "circle":
            draw.ellipse(
                [cx - radius, cy - radius, cx + radius, cy + radius], fill=fill, outline="black", width=line
            )
        else:  # triangle, square, pentagon, hexagon: 3 to 6 sides
            draw.polygon(_polygon(cx, cy, radius, panel.shape + 3), fill=fill, outline="black", width=line)
    return image


def write_puzzles(puzzles: Sequence[RavenPuzzle], out_dir: str | Path, panel_size: int = 160) -> Path:
    """PNG files plus `index.json` in the same layout as the IQ50 loader reads; returns the index path."""
    out = Path(out_dir)
    index = []
    for n, puzzle in enumerate(puzzles):
        folder = out / f"{n:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        entry = {
            "id": f"{n:05d}",
            "context": [],
            "candidates": [],
            "answer": puzzle.answer,
            "rules": puzzle.rules,
        }
        for kind, panels in (("context", puzzle.context), ("candidates", puzzle.candidates)):
            for i, panel in enumerate(panels):
                name = f"{folder.name}/{kind}_{i}.png"
                render_panel(panel, panel_size).save(out / name)
                entry[kind].append(name)
        index.append(entry)
    path = out / "index.json"
    path.write_text(json.dumps(index, indent=1))
    return path


__all__ = [
    "BASELINES",
    "COUNT_WORDS",
    "DEFAULT_CANDIDATES",
    "Panel",
    "RavenPuzzle",
    "baseline_choices",
    "candidate_is_correct",
    "check_candidate_count",
    "generate_puzzles",
    "make_puzzle",
    "render_panel",
    "write_puzzles",
]
