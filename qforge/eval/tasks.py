"""The demo task: short English sentences about a person -> one fixed, compact JSON object.

    user:      "Maria Lopez, 34, lives in Porto and works as a nurse."
    assistant: {"name": "Maria Lopez", "age": 34, "city": "Porto", "job": "nurse"}

The base SmolLM2-135M-Instruct does not produce this exact object (it renames keys, quotes the
age, adds prose), while a small LoRA adapter learns it in minutes on a CPU: the sentences come
from a handful of templates and every value is copied from the sentence. Rows are generated from
the seeded templates and word lists below; the test split uses the same templates but people
(full names) that appear in no other split. The shipped files in qforge/data/demo_task/ are
exactly `generate_task()`'s output (a test checks it).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

DEMO_TASK_DIR = Path(__file__).resolve().parent.parent / "data" / "demo_task"
SYSTEM_PROMPT = "Extract the person's name, age, city and job as JSON."
KEYS = ("name", "age", "city", "job")

FIRST_NAMES = (
    "Maria", "James", "Aisha", "Lucas", "Sofia", "Noah", "Emma", "Liam", "Olivia", "Mateo",
    "Yuki", "Omar", "Chloe", "Ivan", "Priya", "Diego", "Hannah", "Kwame", "Elena", "Tom",
    "Fatima", "Leo", "Grace", "Raj", "Nina", "Samuel", "Ines", "Jonas", "Amara", "Pablo",
    "Lena", "Hugo", "Zara", "Felix", "Mei", "Andre", "Clara", "Tariq", "Julia", "Ben",
    "Rosa", "Oscar", "Leila", "Marco", "Anna", "Kofi", "Eva", "Daniel", "Sara", "Victor",
    "Ada", "Nikolai", "Lucia", "Ethan", "Mila", "Rafael", "Alice", "Kenji", "Ruth", "Adam",
)
LAST_NAMES = (
    "Lopez", "Smith", "Khan", "Silva", "Rossi", "Kim", "Muller", "Novak", "Garcia", "Tanaka",
    "Okafor", "Dubois", "Jensen", "Petrov", "Patel", "Costa", "Nguyen", "Schmidt", "Ahmed", "Brown",
    "Moreau", "Ivanova", "Mensah", "Larsen", "Chen", "Fischer", "Haddad", "Walsh", "Romero", "Sato",
    "Kowalski", "Berg", "Santos", "Wilson", "Ortiz", "Yilmaz", "Murphy", "Weber", "Ferreira", "Lee",
    "Bianchi", "Popescu", "Nowak", "Adeyemi", "Hansen", "Suzuki", "Marin", "Taylor", "Vargas", "Ali",
    "Horvat", "Kaplan", "Reyes", "Lindqvist", "Mendes", "Park", "Duarte", "Conti", "Evans", "Sousa",
)
CITIES = (
    "Porto", "Lisbon", "Madrid", "Paris", "Berlin", "Rome", "Vienna", "Prague", "Warsaw", "Oslo",
    "Dublin", "London", "Leeds", "Lyon", "Milan", "Naples", "Munich", "Hamburg", "Zurich", "Geneva",
    "Athens", "Istanbul", "Cairo", "Nairobi", "Lagos", "Accra", "Tokyo", "Osaka", "Seoul", "Hanoi",
    "Mumbai", "Delhi", "Dubai", "Sydney", "Perth", "Toronto", "Montreal", "Chicago", "Boston", "Denver",
    "Seattle", "Austin", "Lima", "Bogota", "Santiago", "Quito", "Havana", "Helsinki", "Riga", "Krakow",
)
JOBS = (
    "nurse", "teacher", "engineer", "baker", "pilot", "lawyer", "chef", "dentist", "plumber", "architect",
    "librarian", "farmer", "journalist", "pharmacist", "electrician", "painter", "carpenter", "accountant",
    "firefighter", "photographer", "mechanic", "designer", "translator", "surgeon", "musician", "gardener",
    "tailor", "barber", "software developer", "data analyst", "bus driver", "police officer", "vet",
    "physiotherapist", "florist", "waiter", "economist", "biologist", "social worker", "web designer",
)
# Several phrasings, so the adapter must find the fields rather than copy fixed positions.
TEMPLATES = (
    "{name}, {age}, lives in {city} and works as {a_job}.",
    "{name} is a {age}-year-old {job} from {city}.",
    "{city}-based {job} {name} ({age}) started a new job this week.",
    "At {age}, {name} works as {a_job} in {city}.",
    "Meet {name}: {a_job} in {city}, aged {age}.",
    "{name} ({age}) has been {a_job} in {city} for years.",
    "Our new neighbour {name} is {age} and works in {city} as {a_job}.",
    "Name: {name}. Age: {age}. Works as {a_job} in {city}.",
)
AGES = (18, 75)


def with_article(job: str) -> str:
    """'a nurse', 'an engineer'."""
    return ("an " if job[0] in "aeiou" else "a ") + job


def target_json(person: dict) -> str:
    """The assistant's answer: the fields in KEYS order, on one line."""
    return json.dumps({key: person[key] for key in KEYS}, ensure_ascii=False)


def make_row(person: dict, template: str) -> dict:
    """One chat row (OpenAI fine-tuning format) for `person` phrased with `template`."""
    sentence = template.format(a_job=with_article(person["job"]), **person)
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": sentence},
                         {"role": "assistant", "content": target_json(person)}]}


def make_task_rows(n_train: int = 800, n_val: int = 100, n_test: int = 100, seed: int = 0) -> dict[str, list[dict]]:
    """{"train", "val", "test"} -> rows. Every person (full name) occurs once across all splits;
    each split cycles through every template before being shuffled."""
    total = n_train + n_val + n_test
    names = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    if total > len(names):
        raise ValueError(f"at most {len(names)} rows (one per full name), asked for {total}")
    rng = random.Random(seed)
    people = [{"name": name, "age": rng.randint(*AGES), "city": rng.choice(CITIES), "job": rng.choice(JOBS)}
              for name in rng.sample(names, total)]
    splits, start = {}, 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        rows = [make_row(p, TEMPLATES[i % len(TEMPLATES)]) for i, p in enumerate(people[start:start + n])]
        rng.shuffle(rows)
        splits[split], start = rows, start + n
    return splits


def write_jsonl(rows: list[dict], path: Path) -> None:
    """One compact JSON object per line, UTF-8, '\\n' line ends (byte-for-byte reproducible)."""
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def generate_task(n_train: int = 800, n_val: int = 100, n_test: int = 100, seed: int = 0,
                  out_dir: str | Path = DEMO_TASK_DIR) -> dict[str, Path]:
    """Write train.jsonl, val.jsonl and test.jsonl under out_dir; returns split -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in make_task_rows(n_train, n_val, n_test, seed).items():
        paths[split] = out_dir / f"{split}.jsonl"
        write_jsonl(rows, paths[split])
    return paths


def demo_task_paths() -> dict[str, Path]:
    """The shipped split files (split -> path)."""
    return {split: DEMO_TASK_DIR / f"{split}.jsonl" for split in ("train", "val", "test")}


def prompt_messages(row: dict) -> list[dict]:
    """The conversation up to the answer (what a model is given at evaluation time)."""
    return row["messages"][:-1]


def expected_object(row: dict) -> dict:
    """The answer of a task row, parsed."""
    return json.loads(row["messages"][-1]["content"])


def first_json_object(text: str) -> dict | None:
    """The first {...} in `text` that parses as a JSON object, or None."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
            if isinstance(value, dict):
                return value
        except json.JSONDecodeError:
            pass
        start = text.find("{", start + 1)
    return None


def exact_match(prediction: str, row: dict) -> bool:
    """True when the first JSON object in `prediction` equals the row's answer: same keys and
    values, any key order or whitespace. Types count (age "34" is not 34, true is not 1)."""
    got = first_json_object(prediction)
    if got is None:
        return False
    # comparing canonical dumps rather than dicts, where True == 1 and 34.0 == 34
    return json.dumps(got, sort_keys=True) == json.dumps(expected_object(row), sort_keys=True)


DEMO_RECIPE_PATH = Path(__file__).resolve().parent.parent / "data" / "demo.yaml"  # = configs/demo.yaml


def demo_recipe() -> dict:
    """The demo recipe (qforge/data/demo.yaml, which configs/demo.yaml links to) as TrainConfig keys,
    its data and eval_data pointing at the demo task files shipped in the package."""
    import yaml

    recipe = yaml.safe_load(DEMO_RECIPE_PATH.read_text())
    paths = demo_task_paths()
    return dict(recipe, data=str(paths["train"]), eval_data=str(paths["val"]))
