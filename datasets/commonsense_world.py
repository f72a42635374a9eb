"""A small procedural world of commonsense facts: the text ``tiny-lm`` is pretrained on, and tasks in the formats of
the eight commonsense tasks of LLM-Adapters (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA) written
in their layout (``commonsense_170k.json``, ``dataset/<task>/test.json``), so the real reader and pipeline run on it.

The world is a table of facts (``ANIMALS``: home, movement, food, size; ``TOOLS``: what each is used for;
``PROPERTIES``: things that are hot, cold, soft...; ``FEELINGS``: what someone in a state wants; ``SCRIPTS``: the
steps of everyday activities). ``pretraining_text`` states them in several phrasings, and answers free-form
questions about them in the Alpaca template (the answer words, never the eight tasks' labels such as ``answer2``);
``task_records`` asks about them in each task's instruction format, with LLM-Adapters' fields and answer labels
(BoolQ: a yes/no fact; PIQA: which tool does a job; SIQA: what someone wants next; HellaSwag: the next step of an
activity; WinoGrande: which of two animals fills a blank about size; ARC-e: one fact; ARC-c: two facts chained;
OBQA: which thing has a property). A pretrained model thus knows the facts but not the tasks' formats: fine-tuning
teaches the formats, as Commonsense170K does for LLaMA.

    python -m datasets.commonsense_world --root /tmp/commonsense --train 200 --test 100
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable, Iterator

from .commonsense import TASKS, TEST_FOLDER, TRAIN_FILE, TRAIN_NO_INPUT

#: animal: (home, how it moves, what it eats, size)
ANIMALS = {
    "fish": ("river", "swim", "worms", "small"), "cow": ("farm", "walk", "grass", "big"),
    "bird": ("nest", "fly", "seeds", "small"), "horse": ("stable", "run", "hay", "big"),
    "frog": ("pond", "jump", "flies", "small"), "bee": ("hive", "fly", "nectar", "small"),
    "whale": ("sea", "swim", "krill", "big"), "rabbit": ("burrow", "hop", "carrots", "small"),
    "bear": ("cave", "climb", "honey", "big"), "mouse": ("hole", "run", "cheese", "small"),
    "camel": ("desert", "walk", "leaves", "big"), "owl": ("tree", "fly", "mice", "small"),
    "elephant": ("jungle", "walk", "fruit", "big"), "snail": ("garden", "crawl", "lettuce", "small"),
    "duck": ("lake", "swim", "bread", "small"), "giraffe": ("savanna", "run", "acacia", "big"),
}
#: tool: the job it does
TOOLS = {
    "knife": "cut bread", "hammer": "hit nails", "spoon": "eat soup", "pen": "write a letter",
    "broom": "sweep the floor", "shovel": "dig a hole", "needle": "sew a shirt", "saw": "cut wood",
    "brush": "paint a wall", "cup": "drink milk", "key": "open a door", "ladder": "reach a high shelf",
    "bucket": "carry water", "towel": "dry your hands", "umbrella": "stay dry in the rain", "oven": "bake a cake",
}
#: property: things that have it (none of the things of one property has its opposite)
PROPERTIES = {
    "hot": ("fire", "the sun", "an oven", "a stove"), "cold": ("ice", "snow", "a freezer", "frost"),
    "soft": ("a pillow", "a feather", "wool", "a sponge"), "hard": ("a rock", "iron", "a brick", "a diamond"),
    "wet": ("rain", "the sea", "a puddle", "a wave"), "dry": ("sand", "dust", "a desert", "chalk"),
    "sweet": ("sugar", "candy", "honey", "a cake"), "loud": ("thunder", "a drum", "a siren", "a horn"),
}
#: feeling: what someone who has it wants to do
FEELINGS = {
    "hungry": "eat some food", "thirsty": "drink some water", "tired": "go to sleep", "cold": "put on a coat",
    "bored": "play a game", "sad": "talk to a friend", "dirty": "take a bath", "lost": "ask for directions",
    "sick": "see a doctor", "hot": "open a window", "late": "run to the bus", "lonely": "call a friend",
}
#: activity: its steps in order
SCRIPTS = {
    "making tea": ("boils the water", "puts a tea bag in the cup", "pours the hot water", "drinks the tea"),
    "planting a tree": ("digs a hole", "puts the tree in the hole", "covers the roots with dirt", "waters the tree"),
    "washing a car": ("fills a bucket with soap", "scrubs the car", "rinses the car", "dries the car"),
    "baking bread": ("mixes the flour", "kneads the dough", "puts the dough in the oven", "slices the bread"),
    "painting a wall": ("opens the paint", "dips the brush", "paints the wall", "cleans the brush"),
    "making a bed": ("takes off the old sheets", "puts on clean sheets", "fluffs the pillows", "spreads the blanket"),
    "washing dishes": ("fills the sink", "scrubs the plates", "rinses the plates", "stacks the plates"),
    "brushing teeth": ("wets the toothbrush", "adds the toothpaste", "brushes the teeth", "rinses the mouth"),
}
NAMES = ("Alex", "Sam", "Kim", "Jordan", "Riley", "Taylor", "Casey", "Morgan", "Jamie", "Robin")


def article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def fact_sentences(rng: random.Random) -> list[str]:
    """Every fact of the world once, each in a phrasing drawn from ``rng``."""
    out = []
    for animal, (home, move, food, size) in ANIMALS.items():
        a = article(animal)
        out += [rng.choice([f"{a} lives in the {home}.", f"the {animal} makes its home in the {home}."]),
                rng.choice([f"{a} can {move}.", f"the {animal} moves when it can {move}."]),
                rng.choice([f"{a} eats {food}.", f"the food of the {animal} is {food}."]),
                rng.choice([f"{a} is {size}.", f"the {animal} is a {size} animal."])]
    for tool, job in TOOLS.items():
        out.append(rng.choice([f"people use {article(tool)} to {job}.", f"to {job}, you use {article(tool)}."]))
    for prop, things in PROPERTIES.items():
        out += [rng.choice([f"{thing} is {prop}.", f"{thing} feels {prop}."]) for thing in things]
    for feeling, want in FEELINGS.items():
        out.append(rng.choice([f"someone who is {feeling} wants to {want}.", f"when you are {feeling}, you {want}."]))
    for activity, steps in SCRIPTS.items():
        name = rng.choice(NAMES)
        out.append(f"{activity}: {name} " + ", then ".join(steps) + ".")
    return out


QUESTIONS: list[Callable[[random.Random], tuple[str, str]]] = [
    lambda rng: (lambda a: (f"Where does {article(a)} live?", ANIMALS[a][0]))(rng.choice(list(ANIMALS))),
    lambda rng: (lambda a: (f"What does {article(a)} eat?", ANIMALS[a][2]))(rng.choice(list(ANIMALS))),
    lambda rng: (lambda a: (f"How does {article(a)} move?", ANIMALS[a][1]))(rng.choice(list(ANIMALS))),
    lambda rng: (lambda t: (f"What do you use to {TOOLS[t]}?", t))(rng.choice(list(TOOLS))),
    lambda rng: (lambda f: (f"What does someone who is {f} want?", FEELINGS[f]))(rng.choice(list(FEELINGS))),
    lambda rng: (lambda p: (f"Name something {p}.", rng.choice(PROPERTIES[p])))(rng.choice(list(PROPERTIES))),
]


def pretraining_text(count: int, seed: int = 0) -> Iterator[str]:
    """``count`` documents: paragraphs of facts, and (two in five) a free-form question answered in the Alpaca
    template (``the correct answer is <words>``)."""
    rng = random.Random(seed)
    for _ in range(count):
        if rng.random() < 0.4:
            question, answer = rng.choice(QUESTIONS)(rng)
            yield TRAIN_NO_INPUT.format(instruction=question, output=f"the correct answer is {answer}")
        else:
            facts = fact_sentences(rng)
            yield " ".join(rng.sample(facts, rng.randint(4, 9)))


# ---- the eight tasks' formats -------------------------------------------------------------------------------------
def _choices(rng: random.Random, right: str, pool, count: int) -> tuple[list[str], int]:
    options = rng.sample([p for p in dict.fromkeys(pool) if p != right], count - 1) + [right]
    rng.shuffle(options)
    return options, options.index(right) + 1


def _listed(label: str, options: list[str], sep: str = " ") -> str:
    return sep.join(f"{label}{i}: {o}" for i, o in enumerate(options, 1))


def boolq(rng):
    animal, (home, move, food, size) = rng.choice(list(ANIMALS.items()))
    truth = rng.random() < 0.5
    other = lambda column: rng.choice([v[column] for v in ANIMALS.values() if v[column] != ANIMALS[animal][column]])
    question = rng.choice([f"does {article(animal)} live in the {home if truth else other(0)}",
                           f"can {article(animal)} {move if truth else other(1)}",
                           f"does {article(animal)} eat {food if truth else other(2)}"])
    return f"Please answer the following question with true or false, question: {question}?\n\nAnswer format: " \
           "true/false", "true" if truth else "false"


def piqa(rng):
    tool = rng.choice(list(TOOLS))
    options, right = _choices(rng, f"use {article(tool)}", [f"use {article(t)}" for t in TOOLS], 2)
    return (f"Please choose the correct solution to the question: how do you {TOOLS[tool]}?\n\n"
            f"Solution1: {options[0]}\n\nSolution2: {options[1]}\n\nAnswer format: solution1/solution2",
            f"solution{right}")


def social_i_qa(rng):
    name, feeling = rng.choice(NAMES), rng.choice(list(FEELINGS))
    options, right = _choices(rng, FEELINGS[feeling], FEELINGS.values(), 3)
    return (f"Please choose the correct answer to the question: {name} was {feeling} all day. What will {name} "
            f"want to do next?\n\n{_listed('Answer', options)}\n\nAnswer format: answer1/answer2/answer3",
            f"answer{right}")


def hellaswag(rng):
    activity, steps = rng.choice(list(SCRIPTS.items()))
    at = rng.randrange(3)
    pool = [s for a, other in SCRIPTS.items() if a != activity for s in other] + [steps[at]]
    options, right = _choices(rng, steps[at + 1], pool, 4)
    name = rng.choice(NAMES)
    return (f"Please choose the correct ending to complete the given sentence: {activity}: {name} {steps[at]}, "
            f"then\n\n{_listed('Ending', options)}\n\nAnswer format: ending1/ending2/ending3/ending4",
            f"ending{right}")


def winogrande(rng):
    big = rng.choice([a for a, v in ANIMALS.items() if v[3] == "big"])
    small = rng.choice([a for a, v in ANIMALS.items() if v[3] == "small"])
    first, second = (big, small) if rng.random() < 0.5 else (small, big)
    word = rng.choice(["small", "big"])
    sentence = f"The {first} and the {second} met, and the _ was too {word} to notice the other."
    answer = {"small": small, "big": big}[word]  # only the sizes of the two animals tell
    return (f"Please choose the correct answer to fill in the blank to complete the given sentence: {sentence}\n\n"
            f"Option1: {first} Option2: {second} Answer format: option1/option2",
            "option1" if answer == first else "option2")


def _multiple_choice(question: str, options: list[str], right: int) -> tuple[str, str]:
    labels = "/".join(f"answer{i}" for i in range(1, len(options) + 1))
    return (f"Please choose the correct answer to the question: {question}\n\n{_listed('Answer', options)}\n\n"
            f"Answer format: {labels}", f"answer{right}")


def arc_easy(rng):
    animal, values = rng.choice(list(ANIMALS.items()))
    column, question = rng.choice([(0, f"Which animal lives in the {values[0]}?"),
                                   (2, f"Which animal eats {values[2]}?")])
    pool = [a for a, v in ANIMALS.items() if v[column] != values[column]] + [animal]
    return _multiple_choice(question, *_choices(rng, animal, pool, 4))


def arc_challenge(rng):
    animal, (home, move, food, _) = rng.choice(list(ANIMALS.items()))
    column, question = rng.choice([(2, f"What does the animal that lives in the {home} eat?"),
                                   (1, f"How does the animal that eats {food} move?")])
    right = ANIMALS[animal][column]
    return _multiple_choice(question, *_choices(rng, right, [v[column] for v in ANIMALS.values()], 4))


def openbookqa(rng):
    prop, things = rng.choice(list(PROPERTIES.items()))
    thing = rng.choice(things)
    pool = [t for p, ts in PROPERTIES.items() if p != prop for t in ts] + [thing]
    return _multiple_choice(f"Which of these is {prop}?", *_choices(rng, thing, pool, 4))


GENERATORS = dict(zip(TASKS, (boolq, piqa, social_i_qa, hellaswag, winogrande, arc_easy, arc_challenge,
                              openbookqa)))


def task_records(task: str, count: int, seed: int) -> list[dict]:
    """``count`` records of ``task`` in LLM-Adapters' fields (``output``: "the correct answer is <answer>")."""
    rng = random.Random(f"{task}-{seed}")
    records = []
    for _ in range(count):
        instruction, answer = GENERATORS[task](rng)
        records.append({"instruction": instruction, "input": "", "output": f"the correct answer is {answer}",
                        "answer": answer})
    return records


def write_commonsense(root, train_per_task: int = 200, test_per_task: int = 100, seed: int = 0) -> Path:
    """The eight generated tasks in LLM-Adapters' layout under ``root``: the training records of every task, mixed
    (seed ``seed``), in ``commonsense_170k.json``, the test records in ``dataset/<task>/test.json`` (seed + 1000)."""
    root = Path(root)
    train = [r for task in TASKS for r in task_records(task, train_per_task, seed)]
    random.Random(seed).shuffle(train)
    root.mkdir(parents=True, exist_ok=True)
    (root / TRAIN_FILE).write_text(json.dumps(train, indent=1))
    for task in TASKS:
        folder = root / TEST_FOLDER / task
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "test.json").write_text(json.dumps(task_records(task, test_per_task, seed + 1000), indent=1))
    return root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the generated commonsense tasks in LLM-Adapters' layout.")
    parser.add_argument("--root", required=True)
    parser.add_argument("--train", type=int, default=200, help="training records per task")
    parser.add_argument("--test", type=int, default=100, help="test records per task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_commonsense(args.root, args.train, args.test, args.seed))


if __name__ == "__main__":
    main()
