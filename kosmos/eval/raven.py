"""Raven-style progressive matrices, generated from the rules and rendered with PIL.

A puzzle is a 3x3 grid of panels with the last one missing. Each panel holds identical shapes placed
on a 3x3 grid of slots; four attributes vary over the grid:
- layout: the number of shapes, or the set of occupied slots (one of the two carries a rule);
- shape (triangle, square, pentagon, hexagon, circle), size (6 levels), colour (10 grey levels).
Each attribute follows one rule along every row: constant, progression (+-1 or +-2 per column),
arithmetic (third = first + second, or first - second; union or difference of slot sets) or
distribute-three (three values, each row a cyclic shift of the first, so every column holds them all).

The eight candidates are built as in I-RAVEN: three of the four attributes get one wrong value each,
and the candidates are the 2^3 combinations of right and wrong values. Every right and every wrong
value then appears in exactly four candidates, so nothing about the candidates alone (such as the most
common value) points to the answer: the context has to be read. Every puzzle is checked to have
exactly one candidate that any rule of the family explains, and the answer's place is uniform.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("triangle", "square", "pentagon", "hexagon", "circle")
SIZES = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # shape radius as a fraction of half a slot
NUM_COLOURS = 10  # 0 is white, 9 black
SLOTS = 9
RULES = ("constant", "progression", "arithmetic", "distribute_three")
# Arithmetic over shape kinds has no meaning, so shapes never get that rule.
SHAPE_RULES = ("constant", "progression", "distribute_three")
ATTRIBUTES = ("layout", "shape", "size", "colour")
VALUE_RANGES = {
    "number": (1, SLOTS),
    "shape": (0, len(SHAPES) - 1),
    "size": (0, len(SIZES) - 1),
    "colour": (0, NUM_COLOURS - 1),
}
COUNT_WORDS = {3: "three", 4: "four", 8: "eight"}


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


# --- rules over integer values ----------------------------------------------------------------------

Matrix = list[list[int]]


def _progression_rows(lo: int, hi: int, rng: random.Random) -> tuple[Matrix, str] | None:
    step = rng.choice((-2, -1, 1, 2))
    starts = [a for a in range(lo, hi + 1) if lo <= a + 2 * step <= hi]
    if not starts:
        return None
    rows = [[a, a + step, a + 2 * step] for a in (rng.choice(starts) for _ in range(3))]
    return rows, f"progression {step:+d}"


def _arithmetic_rows(lo: int, hi: int, rng: random.Random) -> tuple[Matrix, str] | None:
    # The second operand is at least 1 so the rule never degenerates into a constant.
    plus = rng.random() < 0.5
    pairs = [
        (a, b)
        for a in range(lo, hi + 1)
        for b in range(max(lo, 1), hi + 1)
        if lo <= (a + b if plus else a - b) <= hi
    ]
    if not pairs:
        return None
    rows = [[a, b, a + b if plus else a - b] for a, b in (rng.choice(pairs) for _ in range(3))]
    return rows, "arithmetic " + ("plus" if plus else "minus")


def _distribute_three_rows(values: Sequence, rng: random.Random) -> tuple[list[list], str]:
    first = rng.sample(list(values), 3)
    shift = rng.choice((1, 2))
    rows = [first[(r * shift) % 3 :] + first[: (r * shift) % 3] for r in range(3)]
    return rows, "distribute_three"


def _value_rows(rule: str, lo: int, hi: int, rng: random.Random) -> tuple[Matrix, str] | None:
    if rule == "constant":
        return [[v] * 3 for v in (rng.randint(lo, hi) for _ in range(3))], "constant"
    if rule == "progression":
        return _progression_rows(lo, hi, rng)
    if rule == "arithmetic":
        return _arithmetic_rows(lo, hi, rng)
    return _distribute_three_rows(range(lo, hi + 1), rng)


def _is_latin(rows: list[list]) -> bool:
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


def _random_slots(count: int, rng: random.Random) -> frozenset[int]:
    return frozenset(rng.sample(range(SLOTS), count))


def _position_rows(rule: str, rng: random.Random) -> tuple[list[list[frozenset[int]]], str] | None:
    if rule == "constant":
        return [
            [s] * 3 for s in (_random_slots(rng.randint(1, SLOTS - 1), rng) for _ in range(3))
        ], "constant"
    if rule == "progression":
        step = rng.choice((-2, -1, 1, 2))
        rows = []
        for _ in range(3):
            first = _random_slots(rng.randint(1, SLOTS - 1), rng)
            rows.append([first, _shifted(first, step), _shifted(first, 2 * step)])
        return rows, f"progression {step:+d}"
    if rule == "arithmetic":
        plus = rng.random() < 0.5
        rows = []
        for _ in range(3):
            while True:
                a, b = _random_slots(rng.randint(1, 5), rng), _random_slots(rng.randint(1, 4), rng)
                c = a | b if plus else a - b
                if c and c != a and a != b:
                    rows.append([a, b, c])
                    break
        return rows, "arithmetic " + ("union" if plus else "difference")
    distinct = set()
    while len(distinct) < 3:
        distinct.add(_random_slots(rng.randint(1, SLOTS - 1), rng))
    return _distribute_three_rows(sorted(distinct, key=sorted), rng)


# --- puzzles -----------------------------------------------------------------------------------------


def _grid_attributes(rng: random.Random) -> tuple[list[list[dict]], dict[str, str], str]:
    """Nine panels' attribute values (rows of dicts) following one random rule per attribute."""
    layout_on = rng.choice(("number", "position"))
    while True:
        rules: dict[str, str] = {}
        columns: dict[str, list] = {}
        for name in ("shape", "size", "colour"):
            lo, hi = VALUE_RANGES[name]
            made = _value_rows(rng.choice(SHAPE_RULES if name == "shape" else RULES), lo, hi, rng)
            if made is None:
                break
            columns[name], rules[name] = made
        else:
            made = (
                _value_rows(rng.choice(RULES), *VALUE_RANGES["number"], rng)
                if layout_on == "number"
                else _position_rows(rng.choice(RULES), rng)
            )
            if made is not None:
                columns["layout"], rule = made
                rules["layout"] = f"{layout_on} {rule}"
                break
    grid = []
    for r in range(3):
        row = []
        for c in range(3):
            layout = columns["layout"][r][c]
            slots = _random_slots(layout, rng) if layout_on == "number" else layout
            row.append(
                {
                    "slots": slots,
                    "shape": columns["shape"][r][c],
                    "size": columns["size"][r][c],
                    "colour": columns["colour"][r][c],
                }
            )
        grid.append(row)
    return grid, rules, layout_on


def _panel(values: dict) -> Panel:
    return Panel(tuple(sorted(values["slots"])), values["shape"], values["size"], values["colour"])


def _wrong_value(attribute: str, right: dict, layout_on: str, rng: random.Random) -> dict:
    if attribute == "layout":
        if layout_on == "number":
            count = rng.choice([n for n in range(1, SLOTS + 1) if n != len(right["slots"])])
            return {"slots": _random_slots(count, rng)}
        while True:
            slots = _random_slots(rng.randint(1, SLOTS), rng)
            if slots != right["slots"]:
                return {"slots": slots}
    lo, hi = VALUE_RANGES[attribute]
    return {attribute: rng.choice([v for v in range(lo, hi + 1) if v != right[attribute]])}


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
    return values_explained([[p.number for p in row] for row in rows]) or positions_explained(
        [[frozenset(p.positions) for p in row] for row in rows]
    )


def make_puzzle(rng: random.Random) -> RavenPuzzle:
    """One puzzle with eight candidates of which exactly one is correct."""
    while True:
        grid, rules, layout_on = _grid_attributes(rng)
        right = grid[2][2]
        context = [_panel(v) for row in grid for v in row][:8]
        perturbed = rng.sample(ATTRIBUTES, 3)
        wrong = {a: _wrong_value(a, right, layout_on, rng) for a in perturbed}
        candidates = []
        for choice in itertools.product((False, True), repeat=3):
            values = dict(right)
            for attribute, use_wrong in zip(perturbed, choice):
                if use_wrong:
                    values.update(wrong[attribute])
            candidates.append(_panel(values))
        correct = [candidate_is_correct(context, c) for c in candidates]
        if correct == [True] + [False] * 7:
            order = list(range(8))
            rng.shuffle(order)
            return RavenPuzzle(context, [candidates[i] for i in order], order.index(0), rules)


def generate_puzzles(count: int, seed: int) -> list[RavenPuzzle]:
    rng = random.Random(seed)
    return [make_puzzle(rng) for _ in range(count)]


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
    line = max(1, size // 80)
    draw.rectangle([0, 0, size - 1, size - 1], outline="black", width=line)
    margin = size * 0.05
    slot = (size - 2 * margin) / 3
    grey = round(255 * (1 - panel.colour / (NUM_COLOURS - 1)))
    for position in panel.positions:
        row, col = divmod(position, 3)
        cx, cy = margin + (col + 0.5) * slot, margin + (row + 0.5) * slot
        radius = SIZES[panel.size] * slot / 2
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
    "COUNT_WORDS",
    "Panel",
    "RavenPuzzle",
    "candidate_is_correct",
    "generate_puzzles",
    "make_puzzle",
    "render_panel",
    "write_puzzles",
]
