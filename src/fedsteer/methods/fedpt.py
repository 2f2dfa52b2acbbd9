"""FedPT (arXiv 2410.00362): federated LoRA on a small LM steers a large LM by proxy-tuning.

Devices run FedAvg-LoRA on the small model (the run's `--model`), exactly as
`fedavg-lora`. The server, which alone holds the large model (`large`, reached only for
scores over the vocabulary), then

1. proxy-tunes it with the averaged adapter: s_large + α·(s_small_tuned − s_small_base);
2. distils that proxy-tuned model back into the small model's adapter (KL at the answer
   position over a server-side unlabelled transfer set, temperature T), and sends the
   distilled adapter to the devices for the next round.

Choices where the paper's public text leaves details open (see METHODS.md, "unconfirmed"):
the transfer set is held-out task texts (the dev split, else test rows that are not
evaluated), T = 1, and distillation updates the LoRA adapter, never the frozen base.
The output is the proxy-tuned large model with the last round's averaged adapter;
evaluation also reports it with the distilled adapter, the small tuned model alone and
the large model zero-shot, so one run fills a comparison row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import RecordDict

from fedsteer.eval.metrics import classification_metrics
from fedsteer.files import atomic_write_json
from fedsteer.methods.base import Environment, seeded_rng, seeded_subset
from fedsteer.methods.fedavg_lora import FedAvgLoRA, adapter_record, record_weights
from fedsteer.methods.local_training import LocalRun, epoch_batches, train_together
from fedsteer.models.lora import adapter_weights, lora_adapter
from fedsteer.models.proxy import (
    LocalVocabScores,
    check_shared_vocabulary,
    proxy_logprobs,
)

#: what `save_artifact` adds for the proxy-tuned output: its spec and its adapter's folder
PROXY_FILE, PROXY_ADAPTER = "proxy.json", "proxy-adapter"


@dataclass
class FedPT(FedAvgLoRA):
    """FedAvg-LoRA on the devices' small model, proxy-tuning + distillation at the server."""

    name = "fedpt"
    steers = "output"
    # secure_mean: FedAvg-LoRA's (the devices' part is FedAvg under `rule`; the server's
    # part sees only the mean)

    large: str = "qwen2.5-coder-1.5b"
    alpha: float = 1.0
    distill_epochs: int = 1  # 0: no distillation (devices keep the averaged adapter)
    distill_examples: int = 64
    distill_batch_size: int = 8
    distill_lr: float = 5e-4
    temperature: float = 1.0

    def artifact_model(self, model_name: str) -> str:
        return self.large  # the proxy steers the large model; the run's is the small one

    # ---------------------------------------------------------------- server
    def setup(self, env: Environment) -> None:
        """Keep the server's environment (its large model) and refuse a mismatched pair
        before any device works."""
        self.server_env = env
        self.vocabulary(env)

    def after_average(self, rnd: int, state: RecordDict) -> RecordDict:
        """After FedAvg of the devices' adapters (folded in as they arrive): distillation."""
        state["fedavg_adapter"] = state["adapter"]
        if self.distill_epochs > 0:
            distilled = self.distill(state["adapter"], self.server_env, rnd)
            state["adapter"] = adapter_record(distilled)
        return state

    def vocabulary(self, env: Environment) -> int:
        return check_shared_vocabulary(env.lm, env.other_lm(self.large))

    def large_scores(self, env: Environment) -> LocalVocabScores:
        return LocalVocabScores(env.other_lm(self.large), env.task.label_words, env.batch_size)

    def proxy(self, env: Environment, adapter, queries: list[str]) -> torch.Tensor:
        """Proxy-tuned log-probs `[N, V]` of the large model with this small adapter."""
        large = self.large_scores(env).next_token_logprobs(queries)
        tuned, base = self.small_pair(env, adapter, queries)
        return proxy_logprobs(large, tuned, base, self.alpha, self.vocabulary(env))

    def small_pair(self, env: Environment, adapter, queries: list[str]):
        """The small model's log-probs with the adapter, and without (its base: the adapter
        is removed when `small_tuned` returns)."""
        return (self.small_tuned(env, adapter, queries),
                env.scorer().next_token_logprobs(queries))

    def small_tuned(self, env: Environment, adapter, queries: list[str]) -> torch.Tensor:
        """The small model's log-probs with the adapter only (its base is known already)."""
        with lora_adapter(env.lm, self.config, record_weights(adapter)):
            return env.scorer().next_token_logprobs(queries)

    def distill(self, adapter, env: Environment, rnd: int):
        """Train the averaged adapter towards the proxy-tuned large model (KL, temperature T)."""
        queries = self.transfer_queries(env, rnd)
        vocab, temperature = self.vocabulary(env), self.temperature
        target = (self.proxy(env, adapter, queries) / temperature).log_softmax(-1)

        def kl_to_proxy(logp: torch.Tensor, rows: list[int]) -> torch.Tensor:
            student = (logp[:, :vocab] / temperature).log_softmax(-1)
            return F.kl_div(student, target[rows], log_target=True,
                            reduction="batchmean") * temperature**2

        batches = epoch_batches(seeded_rng(self.seed, "distill", rnd), len(queries),
                                self.distill_batch_size, self.distill_epochs)
        with lora_adapter(env.lm, self.config, record_weights(adapter)) as peft_model:
            params = [p for p in peft_model.parameters() if p.requires_grad]
            run = LocalRun(queries, None, batches,
                           torch.optim.AdamW(params, lr=self.distill_lr), loss=kl_to_proxy)
            with torch.enable_grad():
                train_together([run], env.scorer(), lambda active, groups: None)
            return adapter_weights(peft_model)

    def transfer_queries(self, env: Environment, rnd: int) -> list[str]:
        if not env.transfer:
            raise ValueError("FedPT distils on held-out task texts, and this run has none: "
                             "use a task with a dev split or a test_size below the test split")
        rows = seeded_subset(env.transfer, self.distill_examples, self.seed, "transfer", rnd)
        return [env.task.format_query(ex) for ex in rows]  # text only; labels unused

    # --------------------------------------------------------------- artifact
    def save_artifact(self, state: RecordDict, directory, model_name: str, task_name: str):
        """The distilled small adapter (peft's format, as FedAvg-LoRA saves it), and the
        run's output beside it: `proxy.json` names the large model, the small pair and α,
        and `proxy-adapter/` holds the averaged adapter the proxy is tuned with."""
        directory = Path(super().save_artifact(state, directory, model_name, task_name))
        averaged = state["fedavg_adapter"] if "fedavg_adapter" in state else state["adapter"]
        proxy_state = RecordDict({"adapter": averaged})
        super().save_artifact(proxy_state, directory / PROXY_ADAPTER, model_name, task_name)
        spec = {"large": self.large, "small": model_name, "alpha": self.alpha,
                "adapter": PROXY_ADAPTER, "task": task_name}
        atomic_write_json(directory / PROXY_FILE, spec)
        return directory

    # ------------------------------------------------------------- evaluation
    def evaluate(self, state: RecordDict, env: Environment) -> dict[str, Any]:
        queries = [env.task.format_query(ex) for ex in env.test]
        truth = [ex.label for ex in env.test]
        label_ids = env.scorer().labels.first
        vocab = self.vocabulary(env)

        def metrics(logprobs: torch.Tensor) -> dict[str, float]:
            predictions = logprobs[:, label_ids].argmax(-1).tolist()
            return classification_metrics(truth, predictions, len(env.task.labels))

        large = self.large_scores(env).next_token_logprobs(queries)
        averaged = state["fedavg_adapter"] if "fedavg_adapter" in state else state["adapter"]
        tuned, base = self.small_pair(env, averaged, queries)
        distilled = (tuned if state["adapter"] is averaged  # no distillation ran
                     else self.small_tuned(env, state["adapter"], queries))
        result = metrics(proxy_logprobs(large, tuned, base, self.alpha, vocab))
        result["proxy_distilled_accuracy"] = metrics(
            proxy_logprobs(large, distilled, base, self.alpha, vocab))["accuracy"]
        result["small_tuned_accuracy"] = metrics(tuned)["accuracy"]
        result["small_distilled_accuracy"] = metrics(distilled)["accuracy"]
        result["small_zero_shot_accuracy"] = metrics(base)["accuracy"]
        result["large_zero_shot_accuracy"] = metrics(large)["accuracy"]
        if "train" in state:
            result["train_loss"] = list(state["train"]["loss"])
        return result

