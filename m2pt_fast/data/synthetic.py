"""A synthetic multimodal instruction set, rendered on the fly: the embedded default's data.

Scenes of coloured shapes on a 3x3 grid, or a single seven-segment digit, with questions in five
task families: existence (yes/no), colour, count, spatial relation, classification; and three
held-out families (`held_out_record`: the digit's colour, the total count, any shape) that training
never asks, for `evaluate --benchmark synthetic`. Every sample is a
pure function of (seed, index), so data order and content survive a resume and need no files.
Records have the LLaVA layout, with the PIL image itself in place of a file name.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from m2pt_fast.data.conversation import IMAGE_PLACEHOLDER

CANVAS = 96  # pixels; the image processor resizes to the vision tower's size
GRID = 3
BACKGROUND = (200, 200, 200)
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "purple": (130, 40, 170),
    "orange": (250, 140, 20),
    "black": (20, 20, 20),
    "white": (255, 255, 255),
}
SHAPES = ("circle", "square", "triangle", "diamond")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Seven-segment encoding of each digit: segments a (top), b, c, d (bottom), e, f, g (middle).
SEGMENTS = {
    0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg",
    5: "acdfg", 6: "acdefg", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}

EXISTENCE = ("Is there a {color} {shape} in the image?", "Does the image contain a {color} {shape}?")
COLOR = ("What color is the {shape}?", "Which color does the {shape} have?")
COUNT = ("How many {shapes} are there?", "Count the {shapes} in the image.")
LEFT_OF = ("Is the {color} {shape} to the left of the {color2} {shape2}?",)
ABOVE = ("Is the {color} {shape} above the {color2} {shape2}?",)
DIGIT = ("Which digit is shown in the image?", "What number is written here?")
SHAPE = ("What shape is in the image?", "Name the shape in the picture.")
TEMPLATES = EXISTENCE + COLOR + COUNT + LEFT_OF + ABOVE + DIGIT + SHAPE
# Held out from training (never asked by synthetic_record): new instructions on the same kind of
# images, answered with words the trained families use (colours, number words, yes/no). What a model
# gets right here it was never trained to answer: the zero-shot claim in miniature.
DIGIT_COLOR = ("What color is the digit?",)
TOTAL = ("How many shapes are in the image in total?",)
ANY_SHAPE = ("Is there any {shape} in the image?",)
HELD_OUT = DIGIT_COLOR + TOTAL + ANY_SHAPE
DIGIT_COLORS = ("black", "blue", "red")


def synthetic_texts() -> list[str]:
    """Every word a synthetic sample can contain, as texts (for building the tokenizer's vocabulary)."""
    fills = dict(color="", shape="", shapes="", color2="", shape2="")
    return [
        *(t.format(**fills) for t in TEMPLATES + HELD_OUT),
        *COLORS, *SHAPES, *PLURALS.values(), *NUMBER_WORDS, "yes no", IMAGE_PLACEHOLDER,
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


def _draw_digit(draw: ImageDraw.ImageDraw, digit: int, fill) -> None:
    x0, x1, y0, ym, y1, w = CANVAS * 0.3, CANVAS * 0.7, CANVAS * 0.15, CANVAS * 0.5, CANVAS * 0.85, CANVAS * 0.07
    boxes = {
        "a": (x0, y0, x1, y0 + w), "g": (x0, ym - w / 2, x1, ym + w / 2), "d": (x0, y1 - w, x1, y1),
        "f": (x0, y0, x0 + w, ym), "b": (x1 - w, y0, x1, ym),
        "e": (x0, ym, x0 + w, y1), "c": (x1 - w, ym, x1, y1),
    }
    for segment in SEGMENTS[digit]:
        draw.rectangle(boxes[segment], fill=fill)


def _scene(rng: random.Random) -> list[dict[str, Any]]:
    cells = rng.sample([(row, col) for row in range(GRID) for col in range(GRID)], rng.randint(1, 5))
    return [dict(shape=rng.choice(SHAPES), color=rng.choice(list(COLORS)), row=r, col=c) for r, c in cells]


def _render_scene(objects) -> Image.Image:
    image = Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = CANVAS / GRID
    for o in objects:
        _draw_shape(draw, o["shape"], (o["col"] + 0.5) * cell, (o["row"] + 0.5) * cell, cell * 0.35, COLORS[o["color"]])
    return image


def _scene_question(rng: random.Random, objects) -> tuple[str, str]:
    """One (question, answer) about a scene, from a task family drawn at random."""
    family = rng.choice(("existence", "color", "count", "spatial", "shape"))
    present = {(o["color"], o["shape"]) for o in objects}
    if family == "existence":
        if rng.random() < 0.5:
            color, shape = rng.choice(sorted(present))
        else:
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        answer = "yes" if (color, shape) in present else "no"
        return rng.choice(EXISTENCE).format(color=color, shape=shape), answer
    if family == "color":
        unique = [o for o in objects if sum(p["shape"] == o["shape"] for p in objects) == 1]
        if unique:
            o = rng.choice(unique)
            return rng.choice(COLOR).format(shape=o["shape"]), o["color"]
    if family == "spatial" and len(objects) >= 2:
        a, b = rng.sample(objects, 2)
        if a["col"] != b["col"]:
            question = rng.choice(LEFT_OF)
            answer = "yes" if a["col"] < b["col"] else "no"
        else:
            question = rng.choice(ABOVE)
            answer = "yes" if a["row"] < b["row"] else "no"
        fills = dict(color=a["color"], shape=a["shape"], color2=b["color"], shape2=b["shape"])
        return question.format(**fills), answer
    if family == "shape" and len(objects) == 1:
        return rng.choice(SHAPE), objects[0]["shape"]
    shape = rng.choice(SHAPES)
    count = sum(o["shape"] == shape for o in objects)
    return rng.choice(COUNT).format(shapes=PLURALS[shape]), NUMBER_WORDS[count]


def synthetic_record(seed: int, index: int) -> dict[str, Any]:
    """Sample `index` of the synthetic set with `seed`: {"id", "image": PIL.Image, "conversations"}."""
    rng = random.Random(seed * 1_000_003 + index)
    if rng.random() < 0.2:
        digit = rng.randrange(10)
        image = Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
        _draw_digit(ImageDraw.Draw(image), digit, COLORS[rng.choice(DIGIT_COLORS)])
        qa = [(rng.choice(DIGIT), NUMBER_WORDS[digit])]
    else:
        objects = _scene(rng)
        image = _render_scene(objects)
        qa = [_scene_question(rng, objects) for _ in range(rng.choice((1, 1, 2)))]
    conversations = []
    for k, (question, answer) in enumerate(qa):
        text = f"{IMAGE_PLACEHOLDER}\n{question}" if k == 0 else question
        conversations += [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]
    return {"id": f"synthetic-{seed}-{index}", "image": image, "conversations": conversations}


def held_out_record(seed: int, index: int) -> dict[str, Any]:
    """Sample `index` of the held-out families: {"id", "image", "question", "answer", "family"}; a pure
    function of (seed, index), on images drawn as the training set's are."""
    rng = random.Random(seed * 1_000_003 + index + 7_777_777)
    family = ("digit_color", "total", "any_shape")[index % 3]
    if family == "digit_color":
        color = rng.choice(DIGIT_COLORS)
        image = Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
        _draw_digit(ImageDraw.Draw(image), rng.randrange(10), COLORS[color])
        question, answer = DIGIT_COLOR[0], color
    else:
        objects = _scene(rng)
        image = _render_scene(objects)
        if family == "total":
            question, answer = TOTAL[0], NUMBER_WORDS[len(objects)]
        else:
            shape = rng.choice(SHAPES)
            question = ANY_SHAPE[0].format(shape=shape)
            answer = "yes" if any(o["shape"] == shape for o in objects) else "no"
    return {"id": f"held-out-{seed}-{index}", "image": image, "question": question, "answer": answer,
            "family": family}


def write_llava_json(directory, num_samples: int, seed: int = 0) -> tuple[str, str]:
    """Write `num_samples` synthetic records as a LLaVA data set: (data.json path, image folder).

    For trying the file-based data path (and its tests) without any download.
    """
    directory = Path(directory)
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(num_samples):
        record = synthetic_record(seed, index)
        name = f"{index:06d}.png"
        record["image"].save(images / name)
        records.append({"id": record["id"], "image": name, "conversations": record["conversations"]})
    data_path = directory / "data.json"
    data_path.write_text(json.dumps(records, indent=1))
    return str(data_path), str(images)
