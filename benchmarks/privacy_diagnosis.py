"""Why central DP costs IFed-ICL accuracy (issue 41): the context vectors' norms, offline.

No federation, no noise drawn: each client of the privacy benchmark's IFed-ICL cells (sst2,
IID shards, seed 0, 1 demonstration per class) extracts its vectors as the method does, and
we compare, per client, the L2 norm of
- the vectors themselves (what the clip bounded so far),
- their deviation from a public reference: the same extraction on data-free text (the
  task's template with an empty input, one per label word; `IFedICL.reference_reply`),
- their deviation from the clients' own mean (the best any reference could do; not public),
and the size of the noise central DP adds to the mean at a given z and client count
(σ = z·clip/N per coordinate) against the part of the mean that differs from the reference.

Then an offline look at accuracy (`--eval-rows` test rows, the initial coefficients, no
calibration): the clients' mean vectors with central DP's noise for N clients added under
each clip rule — the vectors clipped whole (as before), their deviation from the reference
clipped whole, and each row of the deviation clipped to κ × the reference row's norm with
noise z·√R·clip_row (`relative_clips`) — and the coefficients alone noised. One noise draw
each from a seeded generator: a diagnosis of where noise hurts, not a DP run.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from fedsteer.data import load_task
from fedsteer.experiment import RunConfig, _environment, build_clients
from fedsteer.methods import make_method
from fedsteer.methods.ifed_icl import evaluate_steering
from fedsteer.models import load_model
from fedsteer.models.hooks import initial_coefficients


def flat(record) -> np.ndarray:
    return np.concatenate([record[k].numpy().astype(np.float64).ravel() for k in ("attn", "mlp")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--z", type=float, nargs="+", default=[0.902, 1.3443])
    parser.add_argument("--eval-z", type=float, default=1.3443,
                        help="the vectors' z of the benchmark's ε = 8 cells")
    parser.add_argument("--coef-z", type=float, default=4.033)
    parser.add_argument("--coef-clip", type=float, default=0.1095)
    parser.add_argument("--kappas", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--eval-rows", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/privacy_diagnosis"))
    args = parser.parse_args()
    task = load_task("sst2")
    config = RunConfig(method="ifed-icl", task="sst2", model=args.model, clients=args.clients,
                       partition="iid", test_size=args.eval_rows, seed=0,
                       options={"rounds": 1, "local_epochs": 1, "demos_per_class": 1,
                                "calibration_per_class": 1})
    method = make_method("ifed-icl", **config.method_options())
    env, _ = _environment(config, task, load_model(args.model), None)
    clients = build_clients(config, task, env, centralized=False)
    vectors = np.stack([np.concatenate([t.double().numpy().ravel() for t in method.extract(c)])
                        for c in clients])
    message = method.configure_round(0, method.initial_state(env))
    reference = flat(method.reference_reply(message, env)["vectors"])
    mean = vectors.mean(0)
    norms = {
        "vectors": np.linalg.norm(vectors, axis=1),
        "deviation_from_public_reference": np.linalg.norm(vectors - reference, axis=1),
        "deviation_from_clients_mean": np.linalg.norm(vectors - mean, axis=1),
    }
    values, layers = vectors.shape[1], env.lm.num_layers
    summary = {"model": args.model, "clients": args.clients, "values": values,
               "layers": layers, "reference_norm": float(np.linalg.norm(reference)),
               "mean_norm": float(np.linalg.norm(mean)),
               "mean_minus_reference_norm": float(np.linalg.norm(mean - reference)),
               "median_norms": {k: float(np.median(v)) for k, v in norms.items()},
               "cosine_mean_reference": float(mean @ reference
                                              / np.linalg.norm(mean) / np.linalg.norm(reference))}
    noise = {}
    for z in args.z:
        for n in (100, 1000):
            for clip_name in ("vectors", "deviation_from_public_reference"):
                clip = summary["median_norms"][clip_name]
                sigma = z * clip / n
                noise[f"z={z:g} N={n} clip={clip_name}"] = {
                    "sigma_per_value": sigma, "noise_norm": sigma * math.sqrt(values),
                    "noise_over_mean_minus_reference": sigma * math.sqrt(values)
                    / summary["mean_minus_reference_norm"]}
    summary["central_noise"] = noise
    summary["accuracy_look"] = accuracy_look(args, env, vectors, reference, layers)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"clients{args.clients}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def accuracy_look(args, env, vectors: np.ndarray, reference: np.ndarray, layers: int
                  ) -> dict[str, float]:
    """Accuracy of the mean vectors with central noise under each clip rule (module doc)."""
    rng, width = np.random.default_rng(0), vectors.shape[1] // (2 * layers)
    coef = initial_coefficients(layers, 0.1, 1.0)

    def accuracy(flat_vectors: np.ndarray, coefficients=coef) -> float:
        attn, mlp = (torch.tensor(part.reshape(layers, width), dtype=torch.float32)
                     for part in np.split(flat_vectors, 2))
        return float(evaluate_steering(env, attn, mlp, coefficients)["accuracy"])

    mean, z, out = vectors.mean(0), args.eval_z, {}
    out["no noise"] = accuracy(mean)
    ref_rows = np.linalg.norm(reference.reshape(2 * layers, width), axis=1)
    deviations = (vectors - reference).reshape(len(vectors), 2 * layers, width)
    for n in (1000, 100):
        for name, base in (("vectors clipped whole", np.zeros_like(mean)),
                           ("deviation clipped whole", reference)):
            clip = float(np.median(np.linalg.norm(vectors - base, axis=1)))
            clipped = base + np.mean([(v - base) * min(1.0, clip / np.linalg.norm(v - base))
                                      for v in vectors], axis=0)
            out[f"{name}, N={n}"] = accuracy(clipped + rng.normal(0, z * clip / n, mean.shape))
        for kappa in args.kappas:
            clips = kappa * ref_rows
            norms = np.linalg.norm(deviations, axis=2)
            clipped = deviations * np.minimum(1, clips / np.maximum(norms, 1e-12))[..., None]
            std = z * math.sqrt(2 * layers) * clips / n
            noisy = (reference + clipped.mean(0).ravel()
                     + (rng.normal(0, 1, (2 * layers, width)) * std[:, None]).ravel())
            out[f"rows clipped to κ={kappa:g} × reference rows, N={n}"] = accuracy(noisy)
        sigma = args.coef_z * args.coef_clip / n
        out[f"coefficients alone noised (z={args.coef_z:g}), N={n}"] = accuracy(
            mean, coef + torch.tensor(rng.normal(0, sigma, tuple(coef.shape)),
                                      dtype=coef.dtype))
    for key, value in out.items():
        print(f"{key}: {value:.3f}", flush=True)
    return out


if __name__ == "__main__":
    main()
