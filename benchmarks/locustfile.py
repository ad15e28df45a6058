"""Locust users for `benchmarks/serve_locust.py`: each sends completions one after another to a random adapter, a
quarter of them long (LOCUST_LONG_TOKENS) and the rest short (LOCUST_SHORT_TOKENS), named "long" and "short" in the
statistics. Every request asks min_tokens = max_tokens, so both schedulers generate the same lengths."""

from __future__ import annotations

import os
import random

from locust import HttpUser, task

ADAPTERS = os.environ.get("LOCUST_ADAPTERS", "adapter0").split(",")
KEY = os.environ.get("LOCUST_KEY", "")
SHORT, LONG = int(os.environ.get("LOCUST_SHORT_TOKENS", "16")), int(os.environ.get("LOCUST_LONG_TOKENS", "400"))
PROMPTS = ["Question: What is a Python decorator?\nAnswer:", "The stock market today", "def merge_sorted(a, b):",
           "Symptoms of the common cold include", "In the court's judgment,", "import json\n\ndef load(path):"]


class Client(HttpUser):
    @task
    def complete(self):
        long = random.random() < 0.25
        tokens = LONG if long else SHORT
        self.client.post("/v1/completions", name="long" if long else "short", timeout=1800,
                         headers={"Authorization": f"Bearer {KEY}"},
                         json={"model": random.choice(ADAPTERS), "prompt": random.choice(PROMPTS),
                               "max_tokens": tokens, "min_tokens": tokens, "temperature": 0.8,
                               "seed": random.randrange(1 << 30)})
