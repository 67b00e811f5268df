"""Fixed prompt sets for speculative-decoding benchmarks (documented, versioned with the code).

code: code-like text whose continuation repeats the pattern of earlier spans (raw completion).
chat: short open questions. edit: requests to reproduce or lightly edit text given in the
prompt (copy a passage, add docstrings, renumber a list, rename a variable), the input-grounded
work that prompt lookup is built for (editing code, rewriting documents). chat and edit are
rendered with the model's chat template (CHAT_TEMPLATED).
"""
from __future__ import annotations

CODE = (
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n    return a * b\n\ndef",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
    "class Size:\n    def __init__(self, w, h):\n        self.w = w\n        self.h = h\n\nclass Rect:\n    def __init__(self,",
    "for i in range(10):\n    print(i)\nfor j in range(10):\n    print(j)\nfor k in range(10):\n",
    "SELECT name, age FROM users WHERE age > 30;\nSELECT name, city FROM users WHERE city = 'Paris';\nSELECT name,",
)
CHAT = (
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three tips for learning a new language.",
    "What is the difference between a list and a tuple in Python?",
)
EDIT = (
    "Repeat the following text exactly, word for word:\n\nThe quick brown fox jumps over the lazy dog. A journey "
    "of a thousand miles begins with a single step. All that glitters is not gold. Actions speak louder than "
    "words. Better late than never. Birds of a feather flock together.",
    "Add a docstring to each function below and output the complete code.\n\ndef area(width, height):\n"
    "    return width * height\n\ndef perimeter(width, height):\n    return 2 * (width + height)\n\n"
    "def diagonal(width, height):\n    return (width ** 2 + height ** 2) ** 0.5",
    "Convert this list to a numbered list, keeping every item unchanged:\n\n- apples from the market\n"
    "- bread from the bakery\n- milk from the farm\n- cheese from the shop\n- eggs from the farm\n"
    "- rice from the store",
    "Rename the variable x to count in this code and output the whole program:\n\nx = 0\nfor item in items:\n"
    "    if item.valid:\n        x = x + 1\nprint(x)\nif x > 10:\n    print('many items:', x)\nelse:\n"
    "    print('few items:', x)",
)
SETS = {"code": CODE, "chat": CHAT, "edit": EDIT}
CHAT_TEMPLATED = frozenset({"chat", "edit"})
