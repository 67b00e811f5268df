"""The built-in prompt set of ``luce train-drafter`` (deterministic, versioned with the code).

A drafter learns the target's greedy continuations, so the prompts only need to make the
target write the kinds of text it will be asked for, in volume. Three families:

* **chat** (chat-templated): ``CHAT_TASKS`` x ``TOPICS`` - explanations, lists, poems, stories,
  emails, quizzes ... about 240 topics from science, history, daily life, technology, arts;
* **code-chat** (chat-templated): ``CODE_TASKS`` x the phrases of ``CODE_TOPICS`` - "Write a
  Python function that reverses a string.", in several languages;
* **code-raw** (no template, plain continuation like ``luce bench``'s code set): a function
  header, docstring or comment per ``CODE_TOPICS`` entry in Python, JavaScript and C styles.

``variants`` > 1 renders every chat-templated prompt again under other system messages
(``SYSTEMS``; the first is the template's own default): the greedy reply changes with the
system message, so one prompt list yields several times the data.

Every prompt carries a *group* (its topic, or code topic): held-out prompts come from groups
that no training prompt uses, so the held-out report measures generalisation to new subjects,
not recall of a seen one.
"""
from __future__ import annotations

import random

import attrs

TOPICS = (
    # science and nature
    "the water cycle", "black holes", "photosynthesis", "the immune system", "volcanoes", "plate tectonics",
    "the human heart", "climate change", "honey bees", "coral reefs", "the solar system", "sleep", "DNA",
    "evolution", "gravity", "electricity", "magnetism", "rainbows", "earthquakes", "hurricanes", "the ozone layer",
    "antibiotics", "the human brain", "dinosaurs", "whales", "rainforests", "deserts", "glaciers", "the moon",
    "Mars", "comets", "the speed of light", "atoms", "chemical reactions", "the periodic table", "fungi",
    "bacteria", "viruses", "the nervous system", "digestion", "muscles", "bird migration", "octopuses",
    "tides", "the greenhouse effect", "nuclear fusion", "sound waves", "friction", "fossils", "ants",
    # history and society
    "the French revolution", "the printing press", "the Roman empire", "the moon landing", "ancient Egypt",
    "the industrial revolution", "the Renaissance", "the Silk Road", "the Cold War", "ancient Greece",
    "the Vikings", "the invention of the telephone", "the history of money", "the Olympic games",
    "the Great Wall of China", "democracy", "the Aztec empire", "medieval castles", "the history of writing",
    "world war one", "the civil rights movement", "the age of exploration", "the Ottoman empire",
    "the history of medicine", "the first airplanes", "the Stone Age", "the Maya civilization",
    # daily life, food, health
    "sourdough bread", "coffee", "tea", "chocolate", "healthy breakfast ideas", "running a marathon",
    "learning to swim", "houseplants", "budgeting", "saving for retirement", "time management", "meditation",
    "camping", "gardening tomatoes", "making pasta from scratch", "dog training", "cats", "moving to a new city",
    "public speaking", "job interviews", "writing a resume", "learning a new language", "studying for exams",
    "staying hydrated", "yoga", "cycling to work", "recycling", "minimalism", "road trips", "baking cookies",
    "vegetarian cooking", "first aid", "fixing a flat tire", "organizing a closet", "making friends as an adult",
    "remote work", "birthday parties", "knitting", "fishing", "bird watching", "photography for beginners",
    # technology and computing
    "binary search", "machine learning", "electric cars", "recursion in programming", "the internet",
    "hash tables", "renewable energy", "smartphones", "cloud computing", "encryption", "databases",
    "operating systems", "computer viruses", "3D printing", "virtual reality", "blockchain", "solar panels",
    "robots", "self-driving cars", "search engines", "email", "GPS", "Wi-Fi", "open source software",
    "version control with git", "neural networks", "linked lists", "sorting algorithms", "compilers",
    "the TCP/IP protocol", "web browsers", "password security", "spreadsheets", "video game design",
    "quantum computers", "batteries", "microchips", "social media", "data privacy", "unit testing",
    # economics, math, ideas
    "compound interest", "the stock market", "prime numbers", "inflation", "supply and demand", "taxes",
    "probability", "fractions", "the Pythagorean theorem", "statistics", "infinity", "geometry",
    "the number zero", "game theory", "logic puzzles", "entrepreneurship", "marketing", "banking",
    "international trade", "cryptocurrency", "insurance", "negotiation", "leadership", "teamwork",
    "critical thinking", "ethics", "happiness", "friendship", "curiosity", "creativity",
    # arts, culture, places
    "jazz music", "chess openings", "classical music", "Shakespeare", "impressionist painting", "poetry",
    "the guitar", "the piano", "film making", "comic books", "architecture", "ballet", "opera", "sculpture",
    "science fiction", "fairy tales", "mythology", "museums", "libraries", "the Eiffel Tower", "Japan",
    "the Amazon river", "Antarctica", "the Sahara", "Iceland", "New York City", "the Alps", "Australia",
    "the Pacific Ocean", "Mount Everest", "the Mediterranean diet", "street food", "festivals", "board games",
    "football", "basketball", "tennis", "the Tour de France", "skiing", "surfing", "mountain climbing",
)

CHAT_TASKS = (
    "Explain {} in simple terms.", "Write a short paragraph about {}.", "List three facts about {}.",
    "What is the most surprising thing about {}?", "Describe {} to a ten-year-old.",
    "Give a one-sentence summary of {}.", "What are common misconceptions about {}?",
    "Write a short poem about {}.", "Write a short story that involves {}.", "What are the pros and cons of {}?",
    "How would you teach {} to a beginner?", "Write a haiku about {}.",
    "Compare {} with something from everyday life.", "Why does {} matter?",
    "Give me five questions to test my knowledge of {}.", "Write a tweet about {}.",
    "Summarize the history of {}.", "What should everyone know about {}?",
    "Write an email to a friend about {}.", "Tell me a fun fact about {}.", "Explain {} step by step.",
    "What are the main ideas behind {}?", "Write a dialogue between a teacher and a student about {}.",
    "Create a short quiz about {}.", "What is the future of {}?", "Give an example that illustrates {}.",
    "Explain {} using an analogy.", "Write a blog post introduction about {}.",
    "I am new to {}. Where should I start?", "Write a list of tips related to {}.",
)

# (what the code does, a function name, its arguments)
CODE_TOPICS = (
    ("reverses a string", "reverse_string", "s"),
    ("checks if a number is prime", "is_prime", "n"),
    ("computes the factorial of n", "factorial", "n"),
    ("sorts a list of numbers", "sort_numbers", "values"),
    ("returns the nth Fibonacci number", "fibonacci", "n"),
    ("counts the vowels in a string", "count_vowels", "text"),
    ("checks if a string is a palindrome", "is_palindrome", "s"),
    ("finds the largest element of a list", "find_max", "items"),
    ("merges two sorted lists", "merge_sorted", "a, b"),
    ("removes duplicates from a list", "remove_duplicates", "items"),
    ("computes the average of a list", "average", "values"),
    ("converts Celsius to Fahrenheit", "celsius_to_fahrenheit", "c"),
    ("counts the words in a sentence", "count_words", "sentence"),
    ("flattens a nested list", "flatten", "nested"),
    ("performs binary search on a sorted list", "binary_search", "items, target"),
    ("computes the greatest common divisor of two numbers", "gcd", "a, b"),
    ("checks if two strings are anagrams", "are_anagrams", "a, b"),
    ("capitalizes every word in a string", "title_case", "text"),
    ("reads a file and returns its lines", "read_lines", "path"),
    ("counts how often each word appears", "word_frequencies", "text"),
    ("returns the sum of the digits of a number", "digit_sum", "n"),
    ("transposes a matrix", "transpose", "matrix"),
    ("multiplies two matrices", "matmul", "a, b"),
    ("validates an email address", "is_valid_email", "address"),
    ("generates a random password", "random_password", "length"),
    ("converts a number to binary", "to_binary", "n"),
    ("parses a date string", "parse_date", "text"),
    ("computes the median of a list", "median", "values"),
    ("chunks a list into pieces of size n", "chunks", "items, n"),
    ("finds the second largest number", "second_largest", "values"),
    ("rotates a list by k positions", "rotate", "items, k"),
    ("checks if a year is a leap year", "is_leap_year", "year"),
    ("computes the power set of a set", "power_set", "items"),
    ("implements a stack class", "Stack", ""),
    ("implements a queue using two stacks", "Queue", ""),
    ("implements a linked list", "LinkedList", ""),
    ("counts the lines of code in a directory", "count_lines", "root"),
    ("downloads a web page", "fetch_page", "url"),
    ("computes the distance between two points", "distance", "p, q"),
    ("converts a string to snake case", "to_snake_case", "name"),
    ("finds all prime numbers below n", "primes_below", "n"),
    ("computes a running total of a list", "running_total", "values"),
    ("groups words by their first letter", "group_by_initial", "words"),
    ("shuffles a deck of cards", "shuffle_deck", "deck"),
    ("checks if parentheses are balanced", "balanced", "text"),
    ("evaluates a simple arithmetic expression", "evaluate", "expr"),
    ("computes the area of a circle", "circle_area", "radius"),
    ("finds the longest word in a sentence", "longest_word", "sentence"),
    ("converts Roman numerals to integers", "roman_to_int", "numeral"),
    ("implements bubble sort", "bubble_sort", "values"),
    ("implements quicksort", "quicksort", "values"),
    ("computes the dot product of two vectors", "dot", "u, v"),
    ("counts the set bits of an integer", "count_bits", "n"),
    ("caches the results of a function", "memoize", "func"),
    ("retries a function on failure", "retry", "func, attempts"),
    ("writes a dictionary to a JSON file", "save_json", "data, path"),
    ("returns the unique characters of a string", "unique_chars", "s"),
    ("computes compound interest", "compound_interest", "principal, rate, years"),
    ("converts seconds to hours, minutes and seconds", "format_duration", "seconds"),
    ("finds common elements of two lists", "common_elements", "a, b"),
)

CODE_TASKS = (
    "Write a Python function that {}.", "Write a JavaScript function that {}.", "Write a C function that {}.",
    "Write a Python function that {}, with a docstring and an example.", "Show me Java code that {}.",
    "Write a Rust function that {}.", "Explain how to write code that {}, then give the code.",
    "Write a Python function that {} and a unit test for it.",
)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.capitalize() for w in rest)


def raw_code_prompts(what: str, name: str, args: str) -> list[str]:
    """Plain-text code openings for one CODE_TOPICS entry (no chat template)."""
    doc = what[0].upper() + what[1:]
    if name[0].isupper():  # a class
        return [f"class {name}:\n    \"\"\"{doc.replace('Implements', 'A')}.\"\"\"\n\n    def __init__(self",
                f"// {doc}\nclass {name} {{\n  constructor(",
                f"# {doc} in Python\n\nclass {name}:\n"]
    return [f"def {name}({args}):\n    \"\"\"{doc}.\"\"\"\n",
            f"// {doc}\nfunction {_camel(name)}({args}) {{\n",
            f"# Python 3\n# A function that {what}.\n\n",
            f"/* {doc}. */\nint {name}("]


SYSTEMS = (
    None,  # the chat template's default system message
    "You are a concise assistant. Answer briefly and clearly.",
    "You are a friendly teacher who explains things step by step.",
    "You are an expert writer. Use vivid, precise language.",
)


@attrs.frozen
class Prompt:
    text: str
    chat: bool  # wrap in the chat template
    group: str  # topic: held-out prompts come from groups no training prompt shares
    family: str  # chat | code-chat | code-raw | file
    system: str | None = None  # system message (chat only; None: the template's default)


def with_variants(prompts: list[Prompt], variants: int) -> list[Prompt]:
    """Each chat prompt under the first ``variants`` of SYSTEMS (raw prompts once)."""
    if not 1 <= variants <= len(SYSTEMS):
        raise ValueError(f"variants must be in 1..{len(SYSTEMS)}, got {variants}")
    return [attrs.evolve(p, system=sysmsg) for p in prompts
            for sysmsg in (SYSTEMS[:variants] if p.chat else (None,))]


def builtin_prompts(variants: int = 1) -> list[Prompt]:
    out = [Prompt(t.format(topic), True, topic, "chat") for topic in TOPICS for t in CHAT_TASKS]
    out += [Prompt(t.format(what), True, name, "code-chat") for what, name, _ in CODE_TOPICS for t in CODE_TASKS]
    out += [Prompt(text, False, name, "code-raw") for what, name, args in CODE_TOPICS
            for text in raw_code_prompts(what, name, args)]
    return with_variants(out, variants)


def file_prompts(path: str, chat: bool) -> list[Prompt]:
    """One prompt per line; each line is its own group (a plain random split)."""
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    return [Prompt(t, chat, f"line{i}", "file") for i, t in enumerate(lines)]


def split(prompts: list[Prompt], heldout_frac: float, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held-out) by group: a seeded ``heldout_frac`` of the groups is held out whole.
    Both lists are shuffled (seeded), so a prefix is a fair sample of every family."""
    rng = random.Random(seed)
    groups = sorted({p.group for p in prompts})
    rng.shuffle(groups)
    n_held = max(1, round(len(groups) * heldout_frac)) if heldout_frac > 0 else 0
    held_groups = set(groups[:n_held])
    train = [p for p in prompts if p.group not in held_groups]
    held = [p for p in prompts if p.group in held_groups]
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held
