"""bfloat16 and devices: the scorer's head input, `auto`'s choice, memory refusal, and code
that keeps every tensor on the model's device."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from fedsteer.models import build_tiny_random
from fedsteer.models import placement as placement_mod
from fedsteer.models.hooks import capture, initial_coefficients, inject
from fedsteer.models.placement import (
    CpuBf16Probe,
    ModelTooLargeError,
    Placement,
    PlacementError,
    check_fits,
    cpu_bf16_probe,
    estimate_memory,
    resolve_placement,
)
from fedsteer.models.scoring import LabelScorer

WORDS = (" description", " entity", " abbreviation", " human", " location", " number")
QUERIES = [f"Question: {w} is it, number {i}?\nType:"
           for i, w in enumerate(["what", "who", "where", "when", "how", "why"] * 3)]
PREFIX = "Question: who wrote it?\nType: human\n\nQuestion: where is Rome?\nType: location\n\n"


def test_lm_head_gets_a_contiguous_hidden_state(tiny_lm):
    """`logits_to_keep=1` slices the hidden state; in bfloat16 a strided head input takes a
    kernel hundreds of times slower (benchmarks/results/dtype.md), so the head must get a
    contiguous one."""
    seen: list[bool] = []
    head = tiny_lm.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    try:
        LabelScorer(tiny_lm, WORDS).score(QUERIES[:4])
        LabelScorer(tiny_lm, WORDS).score(QUERIES[:4], PREFIX)
    finally:
        handle.remove()
    assert seen and all(seen)


@pytest.mark.parametrize("prefix", ["", PREFIX])
def test_bfloat16_scores_are_float32_and_give_float32_labels(prefix):
    """Log-probs come out in float32 from bfloat16 activations, close to float32's, and the
    label agrees wherever float32's margin is larger than that difference (a random tiny
    model has near-ties that any rounding may flip)."""
    full, half = build_tiny_random(seed=0), build_tiny_random(seed=0)
    half.model.to(torch.bfloat16)
    expected = LabelScorer(full, WORDS).score(QUERIES, prefix)
    got = LabelScorer(half, WORDS).score(QUERIES, prefix)
    assert got.dtype == torch.float32
    error = (got - expected).abs().max().item()
    assert error < 0.02
    top = expected.topk(2).values
    clear = (top[:, 0] - top[:, 1]) > 2 * error
    assert clear.sum() >= len(QUERIES) // 2
    assert torch.equal(got.argmax(-1)[clear], expected.argmax(-1)[clear])


# ------------------------------------------------------------------- auto placement
def _probe(speedup: float | None, flags=("avx512_bf16",)) -> CpuBf16Probe:
    return CpuBf16Probe("test cpu", tuple(flags) if speedup is not None else (), speedup, "x")


@pytest.fixture()
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(placement_mod, "_mps_available", lambda: False)


def test_auto_picks_bfloat16_on_a_cpu_whose_bf16_units_pay(no_gpu):
    chosen = resolve_placement("auto", "auto", probe=lambda: _probe(2.5, ("amx_bf16",)))
    assert (chosen.device, chosen.dtype) == ("cpu", "bfloat16")
    assert chosen.reason.startswith("auto: cpu, amx_bf16")
    assert chosen.reason.endswith("→ bfloat16")


@pytest.mark.parametrize("probe", [_probe(None), _probe(1.1)])
def test_auto_picks_float32_on_a_cpu_without_useful_bf16(no_gpu, probe):
    chosen = resolve_placement("auto", "cpu", probe=lambda: probe)
    assert chosen.dtype == "float32"
    why = "cpu without amx_bf16 or avx512_bf16" if probe.speedup is None else "(< 1.3x)"
    assert why in chosen.reason and chosen.reason.endswith("→ float32")


def test_auto_on_a_gpu_follows_its_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Test GPU")
    for supported, dtype in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        chosen = resolve_placement(probe=lambda: pytest.fail("no CPU probe on a GPU"))
        assert (chosen.device, chosen.dtype) == ("cuda", dtype)


def test_an_explicit_dtype_is_kept_and_a_missing_gpu_is_refused(no_gpu):
    assert resolve_placement("float16", "cpu").dtype == "float16"
    with pytest.raises(PlacementError, match="--device cuda"):
        resolve_placement("auto", "cuda")
    with pytest.raises(PlacementError, match="--dtype"):
        resolve_placement("double", "cpu")


def test_the_cpu_probe_is_measured_once_and_cached(monkeypatch, tmp_path):
    monkeypatch.setattr(placement_mod, "_probe_path", lambda: tmp_path / "probe.json")
    monkeypatch.setattr(placement_mod, "_cpuinfo", lambda: ("cpu x", {"avx512_bf16", "sse"}))
    timed = []

    def timer(dtype):
        timed.append(dtype)
        return 1.0 if dtype == torch.float32 else 0.25

    first = cpu_bf16_probe(timer)
    again = cpu_bf16_probe(timer)
    assert first.speedup == again.speedup == 4.0 and first.use_bf16
    assert len(timed) == 2  # float32 and bfloat16, once


def test_a_bfloat16_model_computes_its_logits_in_float32():
    """The head's output is not rounded to bf16's 8-bit mantissa (a 0.125-nat step at
    |logit| ≈ 20, which flipped near-tie label predictions): float32 logits from the bf16
    last hidden state, equal to a float32 matmul over it."""
    lm = build_tiny_random()
    lm.model.to(torch.bfloat16)
    ids = lm.tokenizer(QUERIES[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = lm.model(**ids, logits_to_keep=1, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, -1:]
    assert hidden.dtype == torch.bfloat16 and out.logits.dtype == torch.float32
    weight = lm.model.get_output_embeddings().weight
    assert weight.dtype == torch.bfloat16  # the model itself stays bf16
    expected = hidden.float() @ weight.float().T
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- memory
def test_a_model_that_does_not_fit_is_refused_in_one_line(tiny_lm):
    where = Placement("cpu", "float32", "asked")
    small = estimate_memory(tiny_lm.model.config, where, batch_size=16, available=10 * 1024**3)
    assert small.fits
    tight = estimate_memory(tiny_lm.model.config, where, batch_size=16, available=1024**2)
    assert tight.parameters == sum(p.numel() for p in tiny_lm.model.parameters())
    with pytest.raises(ModelTooLargeError, match=r"free: use a smaller model.*bfloat16"):
        check_fits("tiny", tight, where)
    half = estimate_memory(tiny_lm.model.config, Placement("cpu", "bfloat16", ""), 16, 1)
    config = tiny_lm.model.config
    head32 = config.vocab_size * config.hidden_size * 4  # the float32 head a bf16 model keeps
    assert (half.weight_bytes - head32) * 2 == tight.weight_bytes


# ------------------------------------------------------------------- device-clean code
@pytest.fixture()
def meta_lm():
    """tiny-random on the `meta` device: an op mixing in a CPU tensor raises."""
    lm = build_tiny_random(seed=0)
    lm.model.set_attn_implementation("eager")  # sdpa's mask check reads a value (.item())
    lm.model.to("meta")
    return lm


def test_scorer_keeps_every_tensor_on_the_models_device(meta_lm):
    scorer = LabelScorer(meta_lm, WORDS[:2])
    assert scorer.score(QUERIES[:3]).device.type == "meta"
    assert scorer.score(QUERIES[:3], PREFIX).device.type == "meta"
    assert LabelScorer(meta_lm, WORDS[:2], multi_token=True).score(
        QUERIES[:2]).device.type == "meta"
    assert scorer.logprobs(QUERIES[:2]).device.type == "meta"


def test_hooks_keep_every_tensor_on_the_models_device(meta_lm):
    layers, hidden = meta_lm.num_layers, meta_lm.hidden_size
    scorer = LabelScorer(meta_lm, WORDS[:2])
    with capture(meta_lm) as acts:
        scorer.score(QUERIES[:2])
    assert acts.attn[0].device.type == "meta"
    vectors = torch.zeros(layers, hidden, device="meta")
    coef = initial_coefficients(layers, 0.1, 1.0).requires_grad_()  # the CPU master copy
    with inject(meta_lm, vectors, vectors, coef, noise=0.01,
                generator=torch.Generator().manual_seed(0)):
        assert scorer.logprobs(QUERIES[:2]).device.type == "meta"


#: calls that create a tensor; without `device=` they land on the CPU whatever the model
CREATORS = {"zeros", "ones", "arange", "full", "empty", "tensor", "randn", "rand", "randint",
            "eye", "linspace"}
#: the code that runs next to the model: its loading and scoring, the methods' steps, serving
DEVICE_CLEAN = ["methods", "models", "serve"]


def _undeviced_creations(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in CREATORS and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
                and not any(k.arg == "device" for k in node.keywords)):
            found.append(f"{path}:{node.lineno} torch.{node.func.attr}")
    return found


def test_tensors_are_created_with_an_explicit_device():
    """A static check: in the code that runs next to the model (methods too: their label
    targets meet the model's logits), every torch.zeros/ones/arange/full/empty/tensor/
    randn(...) says where it goes (the model's device, or "cpu" on purpose), so a GPU run
    cannot mix in a CPU tensor by omission."""
    src = Path(__file__).parents[1] / "src" / "fedsteer"
    found = [hit for room in DEVICE_CLEAN for path in sorted((src / room).rglob("*.py"))
             for hit in _undeviced_creations(path)]
    assert not found, "\n".join(found)


# ------------------------------------------------------------------- flags and records
def test_run_records_which_dtype_ran_and_why(tmp_path, monkeypatch, no_gpu):
    from typer.testing import CliRunner

    from fedsteer.cli import app

    for probe, dtype in ((_probe(None), "float32"), (_probe(2.5), "bfloat16")):
        monkeypatch.setattr(placement_mod, "cpu_bf16_probe", lambda p=probe: p)
        out = tmp_path / dtype
        result = CliRunner().invoke(app, [
            "run", "zero-shot", "--model", "tiny-random", "--task", "sst2", "--test-size", "4",
            "--dtype", "auto", "--out", str(out)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        placed = json.loads((out / "result.json").read_text())["env"]["placement"]
        assert (placed["device"], placed["dtype"]) == ("cpu", dtype)
        assert placed["reason"].startswith("auto: cpu") and placed["reason"].endswith(dtype)
        assert f"cpu {dtype}" in result.output  # the table's title


def test_a_device_this_machine_lacks_is_one_line_and_exit_2(tmp_path, no_gpu):
    from typer.testing import CliRunner

    from fedsteer.cli import app

    result = CliRunner().invoke(app, ["run", "zero-shot", "--model", "tiny-random",
                                      "--device", "cuda", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "--device cuda" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("method,options", [
    ("ifed-icl", {"rounds": 1, "local_epochs": 1, "demos_per_class": 1,
                  "calibration_per_class": 1}),
    ("fedavg-lora", {"rounds": 1, "local_examples": 4, "batch_size": 2}),
])
def test_replies_are_float32_when_the_model_is_bfloat16(tmp_path, monkeypatch, method, options):
    """What leaves a client (coefficients, vectors, LoRA weights) is float32 even from a
    bfloat16 model: averages and DP noise are then float32 too."""
    from fedsteer.experiment import RunConfig, run_experiment
    from fedsteer.methods import METHODS

    lm = build_tiny_random(seed=0)
    lm.model.to(torch.bfloat16)
    cls = METHODS[method]
    step, replies = cls.client_step, []

    def recording(self, message, client):
        reply = step(self, message, client)
        replies.append(reply)
        return reply

    monkeypatch.setattr(cls, "client_step", recording)
    run_experiment(RunConfig(method, task="sst2", model="tiny-random", clients=2, test_size=4,
                             client_batch=1, options=options), tmp_path, lm=lm)
    dtypes = {array.dtype for reply in replies for record in reply.array_records.values()
              for array in record.values()}
    assert replies and dtypes == {"float32"}
