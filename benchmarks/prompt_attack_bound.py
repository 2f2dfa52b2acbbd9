"""The most a prompt-only Byzantine attack on AsynDBT can cost: the attacker's prompt used as is.

AsynDBT's consensus carries only the discrete prompt (M positions over N candidate words);
each worker keeps its own demonstrations, and evaluation uses the consensus prompt's most
likely words with the worker's demonstrations. So the worst any attack can do to a worker is
make it evaluate with the attacker's prompt. This scores the test rows with that prompt
directly — each position the candidate word that is most harmful on the attacker's own
training rows (the `worst` attack's search), at M = 5 (our benchmark) and M = 75 (the
paper's) — against the same rows with a neutral prompt (the most frequent candidate), with
one fixed demonstration per class, through the local black box. If even this costs fewer
than 5 points, no attack through the consensus can cost plain averaging 5 points.

    .venv/bin/python benchmarks/prompt_attack_bound.py --task trec
"""

from __future__ import annotations

import argparse

import numpy as np
from common import output_arguments, write_outputs

from fedsteer.data import load_task
from fedsteer.eval.metrics import mcnemar_exact, wilson_interval
from fedsteer.experiment import evaluation_rows, transfer_rows
from fedsteer.methods import Environment, seeded_rng
from fedsteer.methods.bdpl import cross_entropy, prompt_prefix, word_candidates
from fedsteer.methods.icl import select_demonstrations
from fedsteer.models import DEFAULT_MODEL, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--task", default="trec")
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--candidates", type=int, default=50)
    parser.add_argument("--search-rows", type=int, default=32)
    parser.add_argument("--lengths", nargs="+", type=int, default=[5, 75])
    output_arguments(parser, "prompt_attack_bound")
    args = parser.parse_args()
    task = load_task(args.task)
    test = evaluation_rows(task, args.test_size, 0)
    env = Environment(task=task.spec, test=test, model_name=args.model, _lm=load_model(args.model),
                      transfer=transfer_rows(task, test))
    box, spec = env.blackbox("local"), task.spec
    words = word_candidates(env.transfer, args.candidates)
    rng = seeded_rng(0, "attack-bound")
    demos = spec.demo_prefix(select_demonstrations(task.train, len(spec.labels), rng))
    search = [task.train[i] for i in rng.choice(len(task.train), args.search_rows, replace=False)]

    def scores(rows, prompt_words):
        return box.label_logprobs([spec.format_query(ex) for ex in rows], spec.label_words,
                                  prefix=prompt_prefix(prompt_words, demos))

    labels = np.array([ex.label for ex in search])
    harm = [cross_entropy(scores(search, [w] * 5), labels) for w in words]
    worst = [words[j] for j in np.argsort(harm)[::-1]]
    truth = [ex.label for ex in test]
    rows = []
    for length in args.lengths:
        neutral = scores(test, [words[0]] * length).argmax(1)
        attacked = scores(test, [worst[j % len(worst)] for j in range(length)]).argmax(1)
        right_n = [int(p == t) for p, t in zip(neutral, truth, strict=True)]
        right_a = [int(p == t) for p, t in zip(attacked, truth, strict=True)]
        _, _, p = mcnemar_exact(right_a, right_n)
        row = {"length": length, "neutral": float(np.mean(right_n)),
               "attacked": float(np.mean(right_a)), "paired_p": p,
               "neutral_ci95": wilson_interval(sum(right_n), len(truth)),
               "attacked_ci95": wilson_interval(sum(right_a), len(truth)),
               "worst_words": worst[:length]}
        rows.append(row)
        print(row, flush=True)
    lines = [f"# Upper bound of a prompt-only attack ({args.task}, {args.model}, "
             f"{len(test)} test rows, one demonstration per class)", "",
             "| prompt length M | neutral prompt | attacker's worst prompt | lost (points) | "
             "paired p |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['length']} | {fmt(r['neutral'], r['neutral_ci95'])} | "
                     f"{fmt(r['attacked'], r['attacked_ci95'])} | "
                     f"{100 * (r['neutral'] - r['attacked']):+.1f} | {r['paired_p']:.3g} |")
    lines += ["", f"Worst words (ranked on {args.search_rows} training rows, each as the whole "
              f"prompt): {', '.join(worst[:10])}…"]
    write_outputs(args.report_dir, "prompt_attack_bound", {"rows": rows}, "\n".join(lines) + "\n",
                  args)


def fmt(value: float, interval) -> str:
    return f"{100 * value:.1f} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


if __name__ == "__main__":
    main()
