"""Seeded demo corpus: three instruction domains, a math target set, planted defects, bad rows.

Domains: arithmetic word problems (step-by-step and answer-only forms), short reviews with a
sentiment label, and small code tasks. Planted defects (responses shuffled to the wrong prompt,
near-duplicates, gibberish) are listed in ``ground_truth.jsonl``, which scoring never reads; a few
malformed rows exercise the quarantine.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ava", "Ben", "Cleo", "Dev", "Emi", "Finn", "Gia", "Hugo", "Ines", "Jon", "Kai", "Lena"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "shells"]
ADJ_POS = ["wonderful", "delightful", "excellent", "charming", "moving", "superb", "fresh", "clever"]
ADJ_NEG = ["dull", "tedious", "clumsy", "boring", "awful", "bland", "messy", "tiresome"]
THINGS = ["film", "album", "novel", "restaurant", "phone", "game", "play", "hotel"]
ASPECTS = ["the staff", "the ending", "the price", "the sound", "the pacing", "the screen", "the story", "the food"]
FUNCS = [
    ("multiply a number by {k}", "def times_{k}(x):\n    return x * {k}"),
    ("add {k} to every number in a list", "def add_{k}(xs):\n    return [x + {k} for x in xs]"),
    ("return the first {k} items of a list", "def first_{k}(xs):\n    return xs[:{k}]"),
    ("repeat a string {k} times", "def repeat_{k}(s):\n    return s * {k}"),
    ("check whether a number is divisible by {k}", "def divisible_by_{k}(n):\n    return n % {k} == 0"),
    ("sum the numbers from 1 to {k}", "def total_{k}():\n    return sum(range(1, {k} + 1))"),
    (
        "keep the words longer than {k} letters",
        "def longer_than_{k}(words):\n    return [w for w in words if len(w) > {k}]",
    ),
    ("raise a number to the power {k}", "def power_{k}(x):\n    return x ** {k}"),
]


def math_problem(rng: random.Random, step_by_step: bool) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(1, 9)
    question = f"{name} has {a} {item} and buys {b} more, then gives away {c}. How many {item} are left?"
    answer = a + b - c
    if step_by_step:
        response = f"{name} starts with {a}. {a} + {b} = {a + b}. {a + b} - {c} = {answer}. #### {answer}"
    else:
        response = f"#### {answer}"
    return {"prompt": f"Question: {question}\nAnswer: ", "response": response, "domain": "math"}


def review(rng: random.Random) -> dict:
    positive = rng.random() < 0.5
    adj, adj2 = rng.sample(ADJ_POS if positive else ADJ_NEG, 2)
    thing, aspect = rng.choice(THINGS), rng.choice(ASPECTS)
    verdict = "I would recommend it" if positive else "I would not go back"
    text = f"The {thing} was {adj} and {aspect} felt {adj2} after {rng.randint(1, 60)} minutes; {verdict}."
    return {"text": text, "label": "positive" if positive else "negative", "domain": "reviews"}


def code_task(rng: random.Random) -> dict:
    task, code = rng.choice(FUNCS)
    k = rng.randint(2, 99)
    project = rng.choice(["a school", "a shop", "a game", "a lab", "a blog", "a bank", "a farm", "a museum"])
    instruction = f"For {project} app, write a Python function to {task.format(k=k)}."
    return {"instruction": instruction, "output": code.format(k=k), "domain": "code"}


def gibberish(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("qzxjkvwpfgh ") for _ in range(n)).strip() or "zzz"


def write_demo_data(folder: str | Path, n_per_domain: int = 900, n_target: int = 100, seed: int = 0) -> dict:
    """Write the demo corpus to ``folder``; returns the paths and the planted-defect counts."""
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    truth: list[dict] = []

    math_rows = [math_problem(rng, step_by_step=rng.random() < 0.5) for _ in range(n_per_domain)]
    review_rows = [review(rng) for _ in range(n_per_domain)]
    code_rows = [code_task(rng) | {"id": f"code-{i}"} for i in range(n_per_domain)]

    # Planted defects (about 3% of each domain each kind), recorded by file and line.
    n_defect = max(1, n_per_domain // 30)
    for i in rng.sample(range(n_per_domain), n_defect):  # responses shuffled to the wrong prompt
        j = (i + 7) % n_per_domain
        math_rows[i] = {**math_rows[i], "response": math_rows[j]["response"], "defect": "shuffled"}
    for i in rng.sample(range(n_per_domain), n_defect):  # gibberish
        math_rows[i] = {**math_rows[i], "response": gibberish(rng, 40), "defect": "gibberish"}
    for i in rng.sample(range(n_per_domain), n_defect):  # label noise in reviews
        flipped = "negative" if review_rows[i]["label"] == "positive" else "positive"
        review_rows[i] = {**review_rows[i], "label": flipped, "defect": "flipped_label"}
    for i in rng.sample(range(n_per_domain), n_defect):  # near-duplicates of another task
        src = code_rows[(i + 3) % n_per_domain]
        code_rows[i] = {**code_rows[i], "instruction": src["instruction"] + " ", "output": src["output"] + "\n"}
        code_rows[i]["defect"] = "near_duplicate"

    def strip_and_record(rows: list[dict], file: str) -> list[dict]:
        out = []
        for line, row in enumerate(rows, start=1):
            row = dict(row)
            defect = row.pop("defect", None)
            if defect:
                truth.append({"file": file, "line": line, "defect": defect})
            out.append(row)
        return out

    paths = {
        "math": folder / "math.jsonl",
        "reviews": folder / "reviews.csv",
        "code": folder / "code.json",
        "target": folder / "target_math.jsonl",
        "ground_truth": folder / "ground_truth.jsonl",
    }
    math_out = strip_and_record(math_rows, "math.jsonl")
    with paths["math"].open("wb") as fh:
        for row in math_out:
            fh.write((json.dumps(row) + "\n").encode())
        # Malformed rows the quarantine must catch (never scored): they follow the good rows.
        fh.write(b'{"prompt": "Question: empty answer?\\nAnswer: ", "response": "   "}\n')
        fh.write(b'{"question": "wrong field names", "answer": "42"}\n')
        fh.write(b'{"prompt": 17, "response": "a number is not a prompt"}\n')
        fh.write(b'{"prompt": "broken json", "response": \n')
        fh.write(b'{"prompt": "bad bytes \xff\xfe", "response": "x"}\n')
    reviews_out = strip_and_record(review_rows, "reviews.csv")
    import csv

    with paths["reviews"].open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label", "domain"])
        writer.writeheader()
        writer.writerows(reviews_out)
    paths["code"].write_text(json.dumps(strip_and_record(code_rows, "code.json"), indent=1))
    with paths["target"].open("w") as fh:
        for _ in range(n_target):
            fh.write(json.dumps(math_problem(rng, step_by_step=True)) + "\n")
    with paths["ground_truth"].open("w") as fh:
        for row in truth:
            fh.write(json.dumps(row) + "\n")
    return {"paths": {k: str(v) for k, v in paths.items()}, "defects": len(truth), "malformed": 5}
