"""The built-in demo pool: about 300 short instruction rows written by this project.

Everything here is generated from the small hand-written seeds below (no copied data), with a
fixed seed, so the pool is byte-identical on every machine. It mixes every record shape
(Alpaca with and without input, LLaMA-Factory ``history``, ShareGPT multi-turn, OpenAI
messages with system prompts, Dolly, Self-Instruct), easy and hard instructions, short and
long answers, planted near-duplicates (paraphrased instructions with the same or slightly
edited answer, so the diversity filter has work) and a handful of deliberately bad rows, so
the rejects output is never empty. Texts are short (most rows < 400 characters) so the
quickstart runs through a real 135M model on 2 CPUs in minutes.
"""

from __future__ import annotations

import json
import os
import random
from typing import NamedTuple

# (instruction, answer) seeds, from easy to hard; answers are written for this project.
SEEDS: list[tuple[str, str]] = [
    ("Name the three primary colors of paint.", "Red, yellow and blue."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Give a synonym for 'happy'.", "Cheerful."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("What do bees make?", "Bees make honey and beeswax."),
    ("Name a mammal that can fly.", "The bat is a mammal that can fly."),
    ("What is the boiling point of water at sea level in Celsius?", "100 degrees Celsius."),
    ("Suggest a name for a pet goldfish.", "How about 'Bubbles'?"),
    (
        "Explain why the sky looks blue.",
        "Sunlight contains all colors. Air molecules scatter short blue wavelengths much more "
        "than long red ones, so blue light reaches our eyes from every direction of the sky.",
    ),
    (
        "Give three tips for sleeping better.",
        "1. Go to bed at the same time every night. 2. Keep screens out of the bedroom. "
        "3. Avoid caffeine after lunch.",
    ),
    (
        "Describe how to boil an egg.",
        "Place the egg in a pot, cover it with cold water and bring it to a boil. Simmer for "
        "7 to 9 minutes, then cool it in cold water before peeling.",
    ),
    (
        "What is the difference between weather and climate?",
        "Weather is the state of the atmosphere over hours or days; climate is the average "
        "pattern of weather in a region over decades.",
    ),
    (
        "Write a haiku about autumn leaves.",
        "Red leaves drift and fall\nwhispering on the cold path\nthe year exhales slow",
    ),
    (
        "Explain what a variable is in programming.",
        "A variable is a named place in memory that holds a value. The program can read the "
        "value by its name and replace it with a new one while it runs.",
    ),
    (
        "Write a Python function that returns the largest number in a list.",
        "def largest(numbers):\n    best = numbers[0]\n    for n in numbers[1:]:\n"
        "        if n > best:\n            best = n\n    return best",
    ),
    (
        "Explain the difference between a list and a tuple in Python.",
        "A list is mutable: you can add, remove or change items. A tuple is immutable once "
        "created, which makes it hashable and usable as a dictionary key.",
    ),
    (
        "Why do we have seasons on Earth?",
        "Earth's axis is tilted about 23.5 degrees. As Earth orbits the Sun, each hemisphere "
        "leans toward the Sun for part of the year (summer: longer days, steeper light) and "
        "away from it for another part (winter).",
    ),
    (
        "Compare TCP and UDP and say when to use each.",
        "TCP gives reliable, ordered delivery with connection setup and retransmission; use it "
        "for web pages, files and email. UDP sends independent datagrams with no guarantees "
        "but little overhead; use it for live video, games and DNS, where late data is useless.",
    ),
    (
        "Explain recursion to a ten-year-old.",
        "Recursion is when something is defined using a smaller version of itself. Imagine "
        "Russian dolls: to open them all, you open one doll and then do the same thing with "
        "the smaller doll inside, until you reach the tiniest one.",
    ),
    (
        "Write a SQL query that counts orders per customer.",
        "SELECT customer_id, COUNT(*) AS orders\nFROM orders\nGROUP BY customer_id\n"
        "ORDER BY orders DESC;",
    ),
    (
        "Summarize the causes of the French Revolution in two sentences.",
        "France faced a debt crisis, food shortages and an unfair tax system that burdened "
        "commoners while nobles and clergy paid little. Enlightenment ideas about rights and "
        "equality turned that anger into demands for a new political order.",
    ),
    (
        "Design a weekly study plan for learning basic Spanish.",
        "Mon: 20 new words. Tue: present tense verbs. Wed: listening practice. Thu: review "
        "words and write five sentences. Fri: a short conversation with a partner or app. "
        "Weekend: watch a show with Spanish subtitles and review mistakes.",
    ),
    (
        "Prove that the sum of two even numbers is even.",
        "Let a = 2m and b = 2n for integers m and n. Then a + b = 2m + 2n = 2(m + n). Since "
        "m + n is an integer, a + b is a multiple of 2, so it is even.",
    ),
    (
        "Explain how a hash table handles collisions.",
        "Two keys can hash to the same slot. Chaining stores a small list of entries per slot; "
        "open addressing probes other slots (linear or quadratic probing) until it finds a free "
        "one. Both keep lookups fast if the table is resized before it gets too full.",
    ),
    (
        "What are the trade-offs of microservices versus a monolith?",
        "Microservices let teams deploy and scale parts independently, but add network calls, "
        "distributed failures and operational overhead. A monolith is simpler to build, test "
        "and debug, but it grows harder to change and scale as the team and code grow.",
    ),
    (
        "Write a short story opening about a lighthouse keeper.",
        "Every night for forty years, Mara climbed the hundred steps and lit the lamp. Tonight, "
        "for the first time, another light answered from the empty sea.",
    ),
    (
        "Give feedback on this thesis: 'Social media is bad.'",
        "It is too broad to argue well. Say for whom, in what way and why: for example, "
        "'Endless feeds harm teenagers' sleep because they remove natural stopping points.'",
    ),
    (
        "Explain gradient descent in machine learning.",
        "Gradient descent minimizes a loss by repeatedly moving the model's parameters a small "
        "step against the gradient, the direction in which the loss grows fastest. The step "
        "size is the learning rate: too large diverges, too small is slow.",
    ),
]

# Paraphrase templates for planted near-duplicates.
PARAPHRASES = [
    "Can you tell me: {q}",
    "Please answer briefly. {q}",
    "{q} Keep it simple.",
    "Quick question - {q}",
]

TOPICS = [
    ("photosynthesis", "how plants turn light, water and carbon dioxide into sugar and oxygen"),
    ("the water cycle", "how water evaporates, condenses into clouds and falls as rain"),
    ("inflation", "a general rise in prices that lowers what money can buy"),
    ("vaccines", "how a harmless piece of a germ trains the immune system"),
    ("black holes", "regions where gravity is so strong that not even light escapes"),
    ("compound interest", "interest earned on both the money saved and past interest"),
    ("plate tectonics", "how Earth's crust moves in plates that cause quakes and mountains"),
    ("the internet", "a network of networks that exchange data with shared protocols"),
]

SENTENCES = [
    ("I loved every minute of this film.", "positive"),
    ("The soup was cold and the waiter was rude.", "negative"),
    ("The package arrived on Tuesday.", "neutral"),
    ("This is the best birthday I have ever had!", "positive"),
    ("My phone broke after two days.", "negative"),
    ("The meeting starts at nine.", "neutral"),
]

WORDS = ["planet", "garden", "rocket", "window", "silver", "pencil", "forest", "bridge"]


def _alpaca(instruction: str, output: str, inp: str = "") -> dict:
    return {"instruction": instruction, "input": inp, "output": output}


def _sharegpt(pairs: list[tuple[str, str]], rid: str | None = None) -> dict:
    conv = []
    for q, a in pairs:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    rec: dict = {"conversations": conv}
    if rid is not None:
        rec = {"id": rid, **rec}
    return rec


def _messages(pairs: list[tuple[str, str]], system: str | None = None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    for q, a in pairs:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def _first_sentence(text: str) -> str:
    cut = text.find(". ")
    return text if cut < 0 else text[: cut + 1]


class DemoLabel(NamedTuple):
    """What a demo row is about, for measuring near-duplicate detection.

    Attributes:
        meaning: keys of what the row says; two rows sharing a key are near-duplicates (the
            same seed in another shape, a paraphrase, a conversation that contains it).
        template: rows with the same template and no shared meaning differ only in their
            numbers or words (``What is 12 + 7?`` vs ``What is 40 + 3?``); "" for none.
    """

    meaning: frozenset[str]
    template: str = ""


def _labelled_records() -> list[tuple[dict | str, DemoLabel | None]]:
    """The demo pool's records in order with their labels (None for the bad rows)."""
    rng = random.Random(20240117)
    good: list[tuple[dict, DemoLabel]] = []

    def add(record: dict, *meaning: str, template: str = "") -> None:
        good.append((record, DemoLabel(frozenset(meaning), template)))

    # 1. Seeds in several shapes (28 x 2 = 56 rows).
    for i, (q, a) in enumerate(SEEDS):
        add(_alpaca(q, a), f"seed{i}")
        shape = i % 4
        if shape == 0:
            add(_sharegpt([(q, a)], rid=f"demo-seed-{i}"), f"seed{i}")
        elif shape == 1:
            add(_messages([(q, a)], system="You are a concise, helpful assistant."), f"seed{i}")
        elif shape == 2:
            add(
                {"instruction": q, "context": "", "response": a, "category": "open_qa"},
                f"seed{i}",
            )
        else:
            add(
                {"id": f"demo-si-{i}", "instruction": q, "instances": [{"input": "", "output": a}]},
                f"seed{i}",
            )

    # 2. Planted near-duplicates: paraphrased instructions, same or lightly edited answers (50).
    for k in range(50):
        j = rng.randrange(len(SEEDS))
        q, a = SEEDS[j]
        para = PARAPHRASES[k % len(PARAPHRASES)].format(q=q[0].lower() + q[1:])
        answer = a if k % 2 == 0 else a.replace(".", "!", 1)
        add(_alpaca(para, answer), f"seed{j}")

    # 3. Arithmetic with computed answers (50): easy one-step and harder multi-step.
    for k in range(50):
        x, y, z = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        key, template = f"arith{k % 3}:{x},{y},{z}", f"arith{k % 3}"
        if k % 3 == 0:
            add(_alpaca(f"What is {x} + {y}?", f"{x} + {y} = {x + y}."), key, template=template)
        elif k % 3 == 1:
            add(
                _messages([(f"Compute {x} * {y}.", f"{x} * {y} = {x * y}.")]),
                key,
                template=template,
            )
        else:
            add(
                _alpaca(
                    f"A shop sells pens at {x} cents each. Ana buys {z} pens and pays with "
                    f"{z * x + y} cents. How much change does she get? Show your steps.",
                    f"The pens cost {z} x {x} = {z * x} cents. Change: {z * x + y} - {z * x} "
                    f"= {y} cents.",
                ),
                key,
                template=template,
            )

    # 4. Alpaca with input: sentiment, word games, sorting (36).
    for k in range(36):
        kind = k % 3
        if kind == 0:
            s, label = SENTENCES[k // 3 % len(SENTENCES)]
            add(
                _alpaca(
                    "Classify the sentiment of the sentence as positive, negative or neutral.",
                    label.capitalize() + ".",
                    s,
                ),
                f"sentiment:{s}",
                template="sentiment",
            )
        elif kind == 1:
            w = WORDS[k // 3 % len(WORDS)]
            add(
                _alpaca("Reverse the letters of the word.", w[::-1], w),
                f"reverse:{w}",
                template="reverse",
            )
        else:
            nums = [rng.randint(1, 50) for _ in range(rng.randint(4, 8))]
            question = "Sort these numbers from smallest to largest: " + ", ".join(map(str, nums))
            add(
                _sharegpt([(question, ", ".join(map(str, sorted(nums))))]),
                f"sort:{nums}",
                template="sort",
            )

    # 5. Explain-a-topic at two lengths, as messages and Dolly (32).
    for topic, gist in TOPICS:
        short = f"{topic.capitalize()} is {gist}."
        long = (
            f"{topic.capitalize()} is {gist}. A good way to picture it is to follow one example "
            f"step by step and ask what changes at each step and why. Scientists study "
            f"{topic} because it explains everyday things we can observe and measure."
        )
        key = f"topic:{topic}"  # four ways to ask for the same definition
        add(_messages([(f"What is {topic}?", short)]), key)
        add(
            _messages(
                [(f"Explain {topic} in detail for a student.", long)],
                system="You are a patient teacher.",
            ),
            key,
        )
        add(
            {
                "instruction": f"Define {topic} in one sentence.",
                "context": "",
                "response": short,
                "category": "open_qa",
            },
            key,
        )
        add(
            {
                "instruction": f"Using the text, what is {topic}?",
                "context": long,
                "response": short,
                "category": "closed_qa",
            },
            key,
        )

    # 6. Multi-turn ShareGPT and LLaMA-Factory history (44).
    for k in range(22):
        j, j2 = (k * 5) % len(SEEDS), (k * 7 + 3) % len(SEEDS)
        q, a = SEEDS[j]
        q2, a2 = SEEDS[j2]
        follow = ("Can you say that in one sentence?", _first_sentence(a))
        turns = [(q, a), follow] if k % 2 == 0 else [(q, a), follow, (q2, a2)]
        # A conversation holds its seeds' exchanges verbatim: it repeats them.
        add(
            _sharegpt(turns, rid=f"demo-chat-{k}"),
            f"chat{k}",
            f"seed{j}",
            *([f"seed{j2}"] if k % 2 else []),
        )
        add(
            {"instruction": follow[0], "input": "", "output": follow[1], "history": [[q, a]]},
            f"chat{k}",
            f"seed{j}",
        )

    # 7. Rows with extra fields that must survive in `extra` (8).
    for k in range(8):
        q, a = SEEDS[k]
        add(
            {**_alpaca(q, a), "source_name": "demo", "tags": ["seed", k % 3], "difficulty": k / 8},
            f"seed{k}",
        )

    rng.shuffle(good)  # the permutation depends on the list's length only
    records: list[tuple[dict | str, DemoLabel | None]] = list(good)
    # 8. Deliberately bad rows (12), at fixed places so they are spread through the file.
    bad: list[dict | str] = [
        '{"instruction": "Name a planet.", "output": "Mars"',  # truncated JSON line
        {"instruction": "Tell me a joke."},  # missing output
        {"instruction": "   ", "input": "", "output": "Nothing to answer."},  # blank instruction
        {"conversations": []},  # empty conversation
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "human", "value": "Hi?"}]},
        {"messages": [{"role": "user", "content": ["not", "a", "string"]}]},  # wrong type
        {
            "conversations": [
                {"from": "human", "value": "Weather in Oslo?"},
                {"from": "function_call", "value": '{"name": "weather"}'},
            ]
        },
        {"question": "What is 2 + 2?", "answer": "4"},  # unknown format
        ["a", "list", "not", "an", "object"],
        {
            "id": "demo-seed-0",
            "conversations": [
                {"from": "human", "value": "Hello again"},
                {"from": "gpt", "value": "Hello!"},
            ],
        },  # dup id
        {"instruction": 42, "output": "The answer."},  # non-string instruction
        {"messages": [{"role": "assistant", "content": "I start the chat."}]},  # no user turn
    ]
    for j, b in enumerate(bad):
        records.insert(20 + j * 23, (b, None))
    return records


def demo_records() -> list[dict | str]:
    """The demo pool's records in order (a str is a deliberately broken JSON line)."""
    return [record for record, _ in _labelled_records()]


def demo_labels() -> list[DemoLabel | None]:
    """Per record of :func:`demo_records` (same positions), what it is about; None for the
    deliberately bad rows. Used to measure near-duplicate detection on the demo pool."""
    return [label for _, label in _labelled_records()]


def write_demo_pool(path: str) -> int:
    """Write the demo pool as JSON lines to ``path``; returns the number of records (lines)."""
    records = demo_records()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return len(records)
