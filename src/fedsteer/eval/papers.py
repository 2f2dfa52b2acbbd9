"""Published numbers (../shared/METHODS.md), shown beside ours but never mixed with them.

They come from other models and setups: the report prints them in their own block,
labelled with the model, so a reader compares orderings, not values.
"""

from __future__ import annotations

PAPER_RESULTS: list[dict] = [
    # IFed-ICL (arXiv 2511.06757), Llama-3-8B, 10 clients, Dirichlet 0.5
    *({"paper": "IFed-ICL", "model": "Llama-3-8B", "task": task, "method": method,
       "accuracy": acc} for task, method, acc in [
        ("subj", "ifed-icl", 91.2), ("subj", "local-icl", 70.0), ("subj", "fedavg-lora", 66.0),
        ("agnews", "ifed-icl", 91.6), ("agnews", "local-icl", 75.0),
        ("agnews", "fedavg-lora", 79.0),
    ]),
    # I2CL (centralized), Llama-2-7B
    *({"paper": "I2CL", "model": "Llama-2-7B", "task": task, "method": "central-i2cl",
       "accuracy": acc} for task, acc in [
        ("sst2", 87.68), ("sst5", 39.12), ("trec", 78.56), ("agnews", 85.48),
        ("subj", 73.84), ("mr", 87.68)]),
    # AsynDBT (arXiv 2602.17694), qwen-max API, 3 workers
    {"paper": "AsynDBT", "model": "qwen-max", "task": "sst2", "method": "asyndbt",
     "accuracy": 92.98},
    {"paper": "AsynDBT", "model": "qwen-max", "task": "sst2", "method": "cen-dbt",
     "accuracy": 94.40},
    {"paper": "AsynDBT", "model": "qwen-max", "task": "sst2", "method": "bdpl",
     "accuracy": 94.30},
]


def paper_rows(tasks: set[str]) -> list[dict]:
    return [r for r in PAPER_RESULTS if r["task"] in tasks]
