"""The shapes world: a deterministic generator of scenes, their images, and the texts of every
task (captions, VQA, NLVR2-style statements, SNLI-VE-style hypotheses).

A scene holds 1..MAX_OBJECTS objects, each with a color (COLORS), a shape (SHAPES), a size
(SIZES) and a position; no two objects share (color, shape), so "the red circle" always names
exactly one object, and objects never overlap. Positions are centres in [0, 1] image
fractions (x from the left, y from the top); `render` draws the scene at any image size
(shapes scale with it) on a lightly mottled grey background and returns PNG bytes.

Relations are stated only when they hold clearly: "A is left of B" means A's centre is more
than MARGIN left of B's (likewise right of / above / below); a relation question ("what is
left of the red circle?") is asked only when exactly one object is clearly on that side and
every other object is on the opposite side, so its answer is unambiguous.

Texts:
  captions     5..9 distinct templated paraphrases per scene (lists with and without sizes,
               counts, colors, left-to-right order, a relation, positions).
  VQA          one question per type and scene where the type applies (color, shape, count,
               existence, relation). Answers come from the fixed ANSWERS vocabulary. A
               `Balancer` picks, within each type, the answer used least so far, so no
               answer dominates its type (yes/no and counts included). Ten simulated
               annotators answer each question: 6..10 give the truth, the rest confuse it
               with a plausible neighbour (orange for red, 2 for 3, ...; at most 3 each, so
               the truth always scores 1.0) or say something outside the vocabulary; the
               builder scores them as VQAv2 (`builders.vqav2.answer_targets`), so the soft
               scores 0 / 0.3 / 0.6 / 0.9 / 1.0 all occur.
  NLVR2        statements about a pair of scenes ("the left image has more circles than
               the right image"), balanced true / false by the same `Balancer`.
  SNLI-VE      one hypothesis per label per image. Entailment: a statement true of the
               image; contradiction: the same kinds of statement, false of the image (an
               absent object, a wrong count, size or relation); neutral: a property the
               picture cannot show (material, weight, temperature, motion, drawing order) of
               an object that *is* depicted, so its presupposition holds and only the
               predicate is undetermined.

Every random choice comes from a numpy Generator seeded by (seed, task/split, record index):
the same seed gives the same scenes, texts and PNG bytes, and records can be made in any order.
Templates are chosen before answers (uniformly among those that apply), so an answer or a
truth value is not given away by which template asked.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import zlib
from typing import Hashable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
RGB = dict(red=(220, 40, 40), green=(40, 170, 60), blue=(40, 90, 220), yellow=(240, 210, 30),
           purple=(140, 60, 190), orange=(245, 140, 30))
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
# Bounding-circle radius range per size, as a fraction of the image side.
RADIUS = dict(small=(0.08, 0.10), large=(0.14, 0.17))
MAX_OBJECTS = 4
# Squares have half-side 0.8 r (corners at 1.13 r): keep that much clear of the borders, and
# GAP between bounding circles so two corners pointing at each other never touch.
_EXTENT = 1.15
GAP = 0.05
BACKGROUND_GREY = (170, 216)  # light grey, every color above stands out against it
TEXTURE = 10.0  # +- amplitude of the low-frequency mottling, in 8-bit levels
NUMBERS = ("zero", "one", "two", "three", "four")
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
MARGIN = 0.1  # a relation holds clearly when centres differ by more than this along its axis
_REGIONS = (("in the top left", "at the top", "in the top right"),
            ("on the left", "in the center", "on the right"),
            ("in the bottom left", "at the bottom", "in the bottom right"))

QUESTION_TYPES = ("color", "shape", "count", "existence", "relation")
ANSWERS = ("yes", "no") + tuple(str(n) for n in range(MAX_OBJECTS + 1)) + COLORS + SHAPES
ANSWER_IDS = {a: i for i, a in enumerate(ANSWERS)}
NUM_ANNOTATORS = 10
DISAGREE_PROBS = (0.35, 0.25, 0.2, 0.12, 0.08)  # P(0..4 annotators do not give the truth)
MAX_SAME_WRONG = 3  # a wrong answer gets at most 3 votes: it scores <= 0.9, the truth 1.0
OFF_VOCABULARY = ("not sure", "nothing", "unknown")  # free answers outside ANSWERS
OFF_VOCABULARY_RATE = 0.15
_CONFUSED_COLORS = dict(red=("orange", "purple"), orange=("red", "yellow"),
                        yellow=("orange", "green"), green=("yellow", "blue"),
                        blue=("purple", "green"), purple=("blue", "red"))

SNLI_LABELS = ("entailment", "neutral", "contradiction")  # = records.SNLI_VE_LABELS
_MATERIALS = ("wood", "metal", "paper", "glass")
_QUALITIES = ("heavy", "hot", "cold", "wet", "soft")
_MOTIONS = ("spinning", "moving", "falling")


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object; x, y: centre as image fractions (x from the left, y from the top)."""
    color: str
    shape: str
    size: str
    x: float
    y: float
    radius: float  # bounding circle, fraction of the image side

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: tuple[int, int, int]
    texture_seed: int


@dataclasses.dataclass(frozen=True)
class Question:
    text: str
    type: str  # QUESTION_TYPES
    answer: str  # the truth, in ANSWERS
    annotators: tuple[str, ...]  # NUM_ANNOTATORS simulated answers


# ------------------------------------------------------------------------------ scenes


def sample_scene(rng: np.random.Generator) -> Scene:
    """1..MAX_OBJECTS objects with distinct (color, shape), placed without overlap."""
    num = int(rng.integers(1, MAX_OBJECTS + 1))
    kinds = rng.choice(len(COLORS) * len(SHAPES), size=num, replace=False)
    sizes = [SIZES[int(i)] for i in rng.integers(len(SIZES), size=num)]
    radii = [float(rng.uniform(*RADIUS[size])) for size in sizes]
    centres = _place(radii, rng)
    objects = tuple(
        Obj(COLORS[int(k) // len(SHAPES)], SHAPES[int(k) % len(SHAPES)], size, x, y, r)
        for k, size, (x, y), r in zip(kinds, sizes, centres, radii))
    grey = int(rng.integers(*BACKGROUND_GREY))
    background = tuple(grey + int(t) for t in rng.integers(-12, 13, size=3))
    return Scene(objects, background, int(rng.integers(2**31)))


def _place(radii: list[float], rng: np.random.Generator) -> list[tuple[float, float]]:
    """Rejection sampling of non-overlapping centres; restarts the layout if one gets stuck."""
    while True:
        placed: list[tuple[float, float, float]] = []
        for r in radii:
            lo = _EXTENT * r
            for _ in range(100):
                x, y = (float(v) for v in rng.uniform(lo, 1.0 - lo, size=2))
                if all(np.hypot(x - px, y - py) > r + pr + GAP for px, py, pr in placed):
                    placed.append((x, y, r))
                    break
            else:
                break
        if len(placed) == len(radii):
            return [(x, y) for x, y, _ in placed]


def render(scene: Scene, image_size: int) -> bytes:
    """The scene as PNG bytes of image_size x image_size RGB pixels (no anti-aliasing)."""
    if not 8 <= image_size <= 4096:
        raise ValueError(f"image_size={image_size} is outside 8..4096")
    size = image_size
    # Low-frequency mottling: a 6x6 grid of offsets, upsampled; cheap at any size.
    coarse = np.random.default_rng(scene.texture_seed).uniform(-TEXTURE, TEXTURE, (6, 6, 1))
    tile = np.clip(np.asarray(scene.background, np.float32) + coarse, 0, 255).astype(np.uint8)
    image = Image.fromarray(tile).resize((size, size), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        x, y, r = o.x * size, o.y * size, o.radius * size
        fill = RGB[o.color]
        if o.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif o.shape == "square":
            h = 0.8 * r
            draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
        else:  # triangle, pointing up, circumradius 1.1 r (looks as large as the others)
            t = 1.1 * r
            draw.polygon([(x, y - t), (x + 0.866 * t, y + 0.5 * t), (x - 0.866 * t, y + 0.5 * t)],
                         fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def holds(relation: str, a: Obj, b: Obj, margin: float = MARGIN) -> bool:
    """Whether `a` is `relation` `b`: centres differ by more than `margin` along its axis."""
    dx, dy = a.x - b.x, a.y - b.y
    return {"left of": dx < -margin, "right of": dx > margin,
            "above": dy < -margin, "below": dy > margin}[relation]


def count(scene: Scene, **attributes: str) -> int:
    """How many objects match all the given attributes (color=, shape=, size=)."""
    return sum(all(getattr(o, k) == v for k, v in attributes.items()) for o in scene.objects)


# ---------------------------------------------------------------------------- language


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _describe(o: Obj, with_size: bool = False) -> str:
    return _a(f"{o.size} {o.name}" if with_size else o.name)


def _join(parts: Iterable[str]) -> str:
    parts = list(parts)
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _number(n: int, noun: str) -> str:
    return f"{NUMBERS[n]} {noun}" + ("" if n == 1 else "s")


def _region(o: Obj) -> str:
    return _REGIONS[min(int(o.y * 3), 2)][min(int(o.x * 3), 2)]


def captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """All distinct caption paraphrases of the scene (at least 5), in template order."""
    objs = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
    num = len(objs)
    plain = _join(_describe(o) for o in objs)
    sized = _join(_describe(o, True) for o in objs)
    shape_counts = [_number(count(scene, shape=s), s) for s in SHAPES if count(scene, shape=s)]
    colors = list(dict.fromkeys(o.color for o in objs))
    out = [plain, sized, f"there {'is' if num == 1 else 'are'} {_number(num, 'shape')}: {sized}",
           f"a picture of {plain}", _join(shape_counts),
           _a(f"{colors[0]} shape") if num == 1 else f"{_join(colors)} shapes"]
    if num == 1:
        o = objs[0]
        out += [f"{plain} {_region(o)}", f"the {o.shape} is {o.color}"]
    else:
        out.append("from left to right: " +
                   _join(_describe(o) for o in sorted(objs, key=lambda o: o.x)))
        related = [(a, rel, b) for a in objs for b in objs if a is not b for rel in RELATIONS
                   if holds(rel, a, b)]
        if related:
            a, rel, b = related[int(rng.integers(len(related)))]
            out.append(f"the {a.name} is {rel} the {b.name}")
        if num <= 3:  # four would run past the tiny model's 32 tokens
            out.append(_join(f"{_describe(o)} {_region(o)}" for o in objs))
    return list(dict.fromkeys(out))


Candidates = dict[str, list[tuple[str, Hashable]]]  # template -> [(text, answer)]


def _add(candidates: Candidates, template: str, answer: Hashable, **fields: str) -> None:
    candidates.setdefault(template, []).append((template.format(**fields), answer))


def question_candidates(scene: Scene) -> dict[str, Candidates]:
    """Every question the scene can answer unambiguously: {type: {template: [(q, answer)]}}."""
    objs = scene.objects
    out: dict[str, Candidates] = {t: {} for t in QUESTION_TYPES}

    def unique(**attributes: str) -> bool:
        return count(scene, **attributes) == 1

    for o in objs:  # color and shape questions name the object by its other attributes
        for ref, ok in ((o.shape, unique(shape=o.shape)),
                        (f"{o.size} {o.shape}", unique(size=o.size, shape=o.shape))):
            if ok:
                _add(out["color"], "what color is the {ref}?", o.color, ref=ref)
                _add(out["color"], "what is the color of the {ref}?", o.color, ref=ref)
        for ref, ok in ((f"{o.color} object", unique(color=o.color)),
                        (f"{o.size} {o.color} object", unique(size=o.size, color=o.color))):
            if ok:
                _add(out["shape"], "what shape is the {ref}?", o.shape, ref=ref)
                _add(out["shape"], "what is the shape of the {ref}?", o.shape, ref=ref)
    counts = out["count"]
    _add(counts, "how many objects are there?", str(len(objs)))
    _add(counts, "how many shapes are there?", str(len(objs)))
    exists = out["existence"]
    for s in SHAPES:
        _add(counts, "how many {shapes} are there?", str(count(scene, shape=s)), shapes=s + "s")
        _add(exists, "are there any {shapes}?", _yes(count(scene, shape=s)), shapes=s + "s")
        for c in COLORS:
            _add(exists, "is there {thing}?", _yes(count(scene, color=c, shape=s)),
                 thing=_a(f"{c} {s}"))
        for z in SIZES:
            _add(exists, "is there {sized}?", _yes(count(scene, size=z, shape=s)),
                 sized=_a(f"{z} {s}"))
    for c in COLORS:
        _add(counts, "how many {color} objects are there?", str(count(scene, color=c)), color=c)
        _add(exists, "is there anything {color}?", _yes(count(scene, color=c)), color=c)
    for z in SIZES:
        _add(counts, "how many {size} objects are there?", str(count(scene, size=z)), size=z)
    for x in objs:
        for rel in RELATIONS:
            holders = [y for y in objs if y is not x and holds(rel, y, x)]
            others_opposite = all(holds(OPPOSITE[rel], z, x, margin=0.0)
                                  for z in objs if z is not x and z not in holders)
            if len(holders) == 1 and others_opposite:
                y = holders[0]
                _add(out["relation"], "what is {rel} the {name}?", y.shape, rel=rel, name=x.name)
                _add(out["relation"], "what color is the object {rel} the {name}?", y.color,
                     rel=rel, name=x.name)
    return out


def _yes(n: int) -> str:
    return "yes" if n else "no"


def statement_candidates(left: Scene, right: Scene) -> Candidates:
    """NLVR2-style statements about an image pair: {template: [(statement, truth)]}."""
    out: Candidates = {}
    scenes = dict(left=left, right=right)
    for side, other in (("left", "right"), ("right", "left")):
        a, b = scenes[side], scenes[other]
        _add(out, "the {side} image has more objects than the {other} image",
             len(a.objects) > len(b.objects), side=side, other=other)
        for s in SHAPES:
            _add(out, "the {side} image has more {shapes} than the {other} image",
                 count(a, shape=s) > count(b, shape=s), side=side, other=other, shapes=s + "s")
        for n in range(1, MAX_OBJECTS + 1):
            _add(out, "the {side} image contains exactly {number}",
                 len(a.objects) == n, side=side, number=_number(n, "object"))
    for c in COLORS:
        left_has, right_has = count(left, color=c) > 0, count(right, color=c) > 0
        _add(out, "both images contain {thing} object", left_has and right_has, thing=_a(c))
        _add(out, "exactly one image contains {thing} object", left_has != right_has,
             thing=_a(c))
        for s in SHAPES:
            _add(out, "neither image contains {thing}",
                 not count(left, color=c, shape=s) and not count(right, color=c, shape=s),
                 thing=_a(f"{c} {s}"))
    for s in SHAPES:
        left_has, right_has = count(left, shape=s) > 0, count(right, shape=s) > 0
        _add(out, "both images contain {shape}", left_has and right_has, shape=_a(s))
        _add(out, "exactly one image contains {shape}", left_has != right_has, shape=_a(s))
        _add(out, "both images have the same number of {shapes}",
             count(left, shape=s) == count(right, shape=s), shapes=s + "s")
    return out


def hypothesis_candidates(scene: Scene) -> dict[str, Candidates]:
    """SNLI-VE-style hypotheses: {label: {template: [(hypothesis, label)]}}."""
    out: dict[str, Candidates] = {label: {} for label in SNLI_LABELS}

    def add(true: bool, template: str, **fields: str) -> None:
        label = "entailment" if true else "contradiction"
        _add(out[label], template, label, **fields)

    objs = scene.objects
    for s in SHAPES:
        add(count(scene, shape=s) == 0, "there are no {shapes}", shapes=s + "s")
        for c in COLORS:
            add(count(scene, color=c, shape=s) > 0, "there is {thing}", thing=_a(f"{c} {s}"))
        for z in SIZES:
            add(count(scene, size=z, shape=s) > 0, "there is {sized}", sized=_a(f"{z} {s}"))
    for n in range(1, MAX_OBJECTS + 1):
        add(len(objs) == n, "the picture shows {number}", number=_number(n, "shape"))
    for o in objs:
        for z in SIZES:
            add(o.size == z, "the {name} is {size}", name=o.name, size=z)
        for b in objs:
            for rel in RELATIONS:
                if b is not o and (holds(rel, o, b) or holds(OPPOSITE[rel], o, b)):
                    add(holds(rel, o, b), "the {name} is {rel} the {other}", name=o.name,
                        rel=rel, other=b.name)
        neutral = out["neutral"]
        for m in _MATERIALS:
            _add(neutral, "the {name} is made of {material}", "neutral", name=o.name, material=m)
        for q in _QUALITIES:
            _add(neutral, "the {name} is {quality}", "neutral", name=o.name, quality=q)
        for m in _MOTIONS:
            _add(neutral, "the {name} is {motion}", "neutral", name=o.name, motion=m)
        for when in ("first", "last"):
            _add(neutral, "the {name} was drawn {when}", "neutral", name=o.name, when=when)
    return out


# ------------------------------------------------------------------- VQA annotators


def _confusions(answer: str) -> tuple[str, ...]:
    """Plausible wrong answers a careless annotator might give instead of `answer`."""
    if answer in ("yes", "no"):
        return ("no",) if answer == "yes" else ("yes",)
    if answer.isdigit():
        n = int(answer)
        return tuple(str(m) for m in (n - 1, n + 1) if 0 <= m <= MAX_OBJECTS)
    if answer in _CONFUSED_COLORS:
        return _CONFUSED_COLORS[answer]
    return tuple(s for s in SHAPES if s != answer)


def annotate(answer: str, rng: np.random.Generator) -> tuple[str, ...]:
    """NUM_ANNOTATORS simulated answers: most the truth, a few confused or off-vocabulary."""
    wrong = int(rng.choice(len(DISAGREE_PROBS), p=DISAGREE_PROBS))
    given = [answer] * (NUM_ANNOTATORS - wrong)
    votes: collections.Counter = collections.Counter()
    for _ in range(wrong):
        options = [a for a in _confusions(answer) if votes[a] < MAX_SAME_WRONG]
        if options and rng.random() >= OFF_VOCABULARY_RATE:
            choice = options[int(rng.integers(len(options)))]
        else:
            choice = OFF_VOCABULARY[int(rng.integers(len(OFF_VOCABULARY)))]
        votes[choice] += 1
        given.append(choice)
    return tuple(given[i] for i in rng.permutation(len(given)))


# ------------------------------------------------------------------------- balancing


class Balancer:
    """Picks questions (or statements) so answers stay balanced: a template uniformly among
    those that apply, then, among that template's answers, the one picked least so far under
    `key` (ties at random), then a text with that answer uniformly."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()

    def pick(self, key: str, candidates: Candidates,
             rng: np.random.Generator) -> tuple[str, Hashable]:
        templates = [t for t, items in candidates.items() if items]
        items = candidates[templates[int(rng.integers(len(templates)))]]
        answers = sorted({a for _, a in items}, key=str)
        fewest = min(self.counts[key, a] for a in answers)
        answers = [a for a in answers if self.counts[key, a] == fewest]
        answer = answers[int(rng.integers(len(answers)))]
        self.counts[key, answer] += 1
        matching = [item for item in items if item[1] == answer]
        return matching[int(rng.integers(len(matching)))]


# ---------------------------------------------------------------------- whole splits


def record_rng(seed: int, task: str, split: str, index: int) -> np.random.Generator:
    """The Generator of one record: independent of every other record, stable across runs."""
    return np.random.default_rng([seed, zlib.crc32(f"{task}/{split}".encode()), index])


def caption_split(seed: int, split: str, num: int, task: str = "captions",
                  per_image: int | None = None) -> Iterator[tuple[Scene, list[str]]]:
    """(scene, captions): all paraphrases, or `per_image` of them chosen at random."""
    for i in range(num):
        rng = record_rng(seed, task, split, i)
        scene = sample_scene(rng)
        texts = captions(scene, rng)
        if per_image is not None:
            texts = [texts[j] for j in sorted(rng.choice(len(texts), per_image, replace=False))]
        yield scene, texts


def vqa_split(seed: int, split: str, num: int) -> Iterator[tuple[Scene, list[Question]]]:
    """(scene, questions): one question of each type that applies to the scene."""
    balancer = Balancer()
    for i in range(num):
        rng = record_rng(seed, "vqa", split, i)
        scene = sample_scene(rng)
        questions = []
        for qtype, candidates in question_candidates(scene).items():
            if any(candidates.values()):
                text, answer = balancer.pick(qtype, candidates, rng)
                questions.append(Question(text, qtype, answer, annotate(answer, rng)))
        yield scene, questions


def nlvr2_split(seed: int, split: str, num: int, statements: int = 3
                ) -> Iterator[tuple[Scene, Scene, list[tuple[str, bool]]]]:
    """(left, right, [(statement, truth)]): `statements` distinct ones per pair."""
    balancer = Balancer()
    for i in range(num):
        rng = record_rng(seed, "nlvr2", split, i)
        left, right = sample_scene(rng), sample_scene(rng)
        candidates = statement_candidates(left, right)
        chosen = []
        for _ in range(statements):
            text, truth = balancer.pick("truth", candidates, rng)
            chosen.append((text, bool(truth)))
            for items in candidates.values():  # no statement twice for one pair
                items[:] = [item for item in items if item[0] != text]
        yield left, right, chosen


def snli_ve_split(seed: int, split: str, num: int
                  ) -> Iterator[tuple[Scene, list[tuple[str, str]]]]:
    """(scene, [(hypothesis, label)]): one hypothesis per label, in random order."""
    for i in range(num):
        rng = record_rng(seed, "snli_ve", split, i)
        scene = sample_scene(rng)
        hypotheses = []
        for candidates in hypothesis_candidates(scene).values():
            templates = [t for t, items in candidates.items() if items]
            items = candidates[templates[int(rng.integers(len(templates)))]]
            hypotheses.append(items[int(rng.integers(len(items)))])
        yield scene, [hypotheses[j] for j in rng.permutation(len(hypotheses))]


def all_texts(seed: int, num_scenes: int) -> Iterator[str]:
    """Every text the world can say about `num_scenes` scenes (each caption, every candidate
    question, statement and hypothesis): the tokenizer's training corpus."""
    for i in range(num_scenes):
        rng = record_rng(seed, "all_texts", "", i)
        scene, other = sample_scene(rng), sample_scene(rng)
        yield from captions(scene, rng)
        for groups in (question_candidates(scene), hypothesis_candidates(scene),
                       {"": statement_candidates(scene, other)}):
            for candidates in groups.values():
                for items in candidates.values():
                    yield from (text for text, _ in items)
