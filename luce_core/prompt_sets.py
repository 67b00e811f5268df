"""Fixed prompt sets for speculative-decoding benchmarks (documented, versioned with the code).

code: repetitive, code-like text where the continuation copies earlier spans (what prompt
lookup exploits). chat: short chat-style questions, rendered with the model's chat template.
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
SETS = {"code": CODE, "chat": CHAT}
