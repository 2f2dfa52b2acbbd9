"""Load a frozen model + tokenizer by registry name, `tiny-random`, local dir or hub id.

Registry models are dequantized from GGUF once (slow: tens of seconds) and cached as float32
safetensors, so every later load is an mmap taking a fraction of a second.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedsteer.models import arch
from fedsteer.models.placement import (
    Placement,
    check_fits,
    estimate_memory,
    resolve_placement,
)
from fedsteer.models.registry import (
    DEFAULT_MODEL,
    REGISTRY,
    ModelSpec,
    is_installed,
    resolve_parts,
)
from fedsteer.settings import cache_dir

__all__ = [
    "TINY_RANDOM",
    "GGUFSizeError",
    "LoadedModel",
    "UnknownModelError",
    "assemble_gguf",
    "ensure_cached",
    "finalize",
    "load_model",
    "load_placed",
    "model_cache_dir",
    "model_status",
]

log = logging.getLogger(__name__)

TINY_RANDOM = "tiny-random"
EMULATOR_PREFIX = "emulator:"
CHUNK_BYTES = 16 * 1024 * 1024
GGUF_NAME = "model.gguf"


class GGUFSizeError(ValueError):
    """The assembled GGUF is not the expected size: a part is truncated or missing."""


class UnknownModelError(ValueError):
    """A name that is neither a registry model, a local dir, nor a reachable hub id."""


@dataclass
class LoadedModel:
    """A frozen model, its tokenizer (left-padded, pad token set) and the name it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    #: the device and dtype it was loaded in and why (None: built directly, float32 CPU)
    placement: Placement | None = None

    @property
    def device(self) -> torch.device:
        """Where the weights live: every tensor made for this model goes there too."""
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return arch.num_layers(self.model)

    @property
    def hidden_size(self) -> int:
        return arch.hidden_size(self.model)

    @property
    def layers(self) -> list[arch.LayerModules]:
        return arch.layer_modules(self.model)


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def contiguous_head_input(model: PreTrainedModel) -> None:
    """Hand the LM head a contiguous hidden state (once per model).

    `logits_to_keep=1` slices `hidden[:, -1:, :]`, a strided view; on the CPU a bfloat16
    matmul over a strided operand leaves oneDNN for a slow generic kernel, orders of
    magnitude slower for the 150k-row head of qwen2.5 (benchmarks/results/dtype.md; the
    same cliff as pytorch/pytorch#151934 reports for bmm). The copy is a few KB and the
    logits are identical, so every forward (scorer, calibration, serve's generate) gets it.
    """
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_fedsteer_contiguous", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._fedsteer_contiguous = True


def _float32_logits(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """The head's logits computed and returned in float32 whatever the model's dtype."""
    if head.weight.dtype == torch.float32:
        return torch.nn.functional.linear(hidden.float(), head.weight, head.bias)
    cached = getattr(head, "_fedsteer_weight32", None)
    if cached is None or cached.device != head.weight.device:
        cached = head._fedsteer_weight32 = head.weight.detach().float()
    bias = None if head.bias is None else head.bias.float()
    return torch.nn.functional.linear(hidden.float(), cached, bias)


def float32_head(model: PreTrainedModel) -> None:
    """Compute the LM head in float32 from the (bf16) last hidden state (once per model).

    A bfloat16 head rounds each logit to 8 bits of mantissa: at |logit| ≈ 20 that is a step
    of 0.125 nats, coarser than many label margins, and on the same 500 rows it flipped 3.8 %
    of subj's central-ICL predictions against float32 (2.2 % of sst2's zero-shot); a float32
    head over the same bf16 activations keeps most of those rows (benchmarks/results/dtype.md).
    The float32 copy of the head costs vocab × hidden × 4 bytes (placement's estimate counts
    it) and, at the one position the scorer keeps, a few percent of a forward.
    """
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear) and not getattr(head, "_fedsteer_float32", False):
        head.forward = _float32_logits.__get__(head)
        head._fedsteer_float32 = True


def finalize(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str) -> LoadedModel:
    """Freeze the model and make the tokenizer batch-ready for generation (left padding)."""
    model.eval()
    contiguous_head_input(model)
    float32_head(model)
    for param in model.parameters():
        param.requires_grad_(False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, name=name)


def model_cache_dir(name: str) -> Path:
    """Where a registry model's dequantized safetensors live."""
    return cache_dir() / "models" / name


def _is_cached(name: str) -> bool:
    # The dir only appears via os.replace of a finished build, so existence means complete.
    return (model_cache_dir(name) / "config.json").is_file()


def model_status(name: str) -> str:
    """'cached', 'installed' (weights present, cache not built) or 'not installed'."""
    spec = REGISTRY[name]
    if _is_cached(name):
        return "cached"
    return "installed" if is_installed(spec) else "not installed"


def assemble_gguf(parts: list[Path], dest: Path, expected_bytes: int | None = None) -> Path:
    """Concatenate `parts` in order into `dest`, streamed; check the total size if known."""
    with open(dest, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, CHUNK_BYTES)
    size = dest.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        dest.unlink()
        raise GGUFSizeError(
            f"assembled GGUF is {size:,} bytes, expected {expected_bytes:,}: "
            f"a weight package is incomplete; reinstall it"
        )
    return dest


def _gguf_for(spec: ModelSpec, workdir: Path) -> Path:
    """A single-file GGUF is used in place; split ones are assembled into `workdir`."""
    parts = resolve_parts(spec)
    if len(parts) == 1 and spec.gguf_bytes is None:
        return parts[0]
    log.info("assembling %d parts of %s into one GGUF", len(parts), spec.name)
    return assemble_gguf(parts, workdir / GGUF_NAME, spec.gguf_bytes)


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize to float32 and strip the quantizer so save_pretrained writes plain tensors."""
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def ensure_cached(spec: ModelSpec) -> Path:
    """Build the safetensors cache for `spec` once (atomically) and return its directory."""
    from fedsteer.eval.report import human_bytes

    final = model_cache_dir(spec.name)
    if _is_cached(spec.name):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}.", dir=final.parent) as tmp:
        workdir = Path(tmp)
        gguf = _gguf_for(spec, workdir)
        log.warning(  # a first run's long silence, explained before it starts
            "first use of %s: building its float32 cache from the %s GGUF in pip package(s) "
            "%s into %s — about %s on disk, ~1 min on 2 cores, once",
            spec.name, human_bytes(gguf.stat().st_size), ", ".join(spec.packages[:1])
            + (" …" if len(spec.packages) > 1 else ""), final,
            human_bytes(float32_bytes(gguf)))
        model, tokenizer = _load_gguf(gguf)
        (workdir / GGUF_NAME).unlink(missing_ok=True)
        out = workdir / "out"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if _is_cached(spec.name):  # another process won the race
            return final
        if final.exists():  # a stale, incomplete leftover
            shutil.rmtree(final)
        os.replace(out, final)
    log.warning("cached %s: %s in %s", spec.name,
                human_bytes(sum(f.stat().st_size for f in final.iterdir())), final)
    return final


def float32_bytes(gguf: Path) -> int:
    """What the GGUF's tensors take dequantized to float32 (read from its header only)."""
    from gguf import GGUFReader

    return 4 * sum(int(t.n_elements) for t in GGUFReader(str(gguf)).tensors)


def _from_dir(path: str | Path, name: str, dtype: torch.dtype) -> LoadedModel:
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return finalize(model, tokenizer, name)


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return env or bool(getattr(constants, "HF_HUB_OFFLINE", False))


HUB_HOST = ("huggingface.co", 443)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub: with no network, transformers would retry for a minute."""
    import socket

    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _not_offline_model(model_id: str, why: str) -> UnknownModelError:
    return UnknownModelError(
        f"{model_id!r} is not a registry model nor a local directory, and {why}. "
        f"Offline models: {', '.join(REGISTRY)}, {TINY_RANDOM} (`fedsteer models`); or pass "
        "the path of a local folder holding config.json and the weights (save_pretrained)."
    )


def _from_hub(model_id: str, dtype: torch.dtype) -> LoadedModel:
    if _offline():
        raise _not_offline_model(model_id, "HF_HUB_OFFLINE is set, so the hub is not asked")
    if not hub_reachable():
        raise _not_offline_model(model_id, f"{HUB_HOST[0]} cannot be reached from here")
    log.info("loading %s through Hugging Face from_pretrained", model_id)
    try:
        return _from_dir(model_id, model_id, dtype)
    except OSError as err:
        raise _not_offline_model(model_id, f"the hub did not serve it ({err})") from err


def load_model(
    name_or_path: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Registry name -> cached safetensors; `tiny-random`; local dir; else a hub id.

    `emulator:K:NAME` is NAME with only K evenly spaced decoder layers (first and last
    kept): the small model of an Offsite-Tuning style emulator pair, same vocabulary.
    """
    if name_or_path.startswith(EMULATOR_PREFIX):
        return load_emulator(name_or_path, dtype)
    if name_or_path in REGISTRY:
        path = ensure_cached(REGISTRY[name_or_path])
        log.info("loading %s from %s", name_or_path, path)
        return _from_dir(path, name_or_path, dtype)
    if name_or_path == TINY_RANDOM:
        from fedsteer.models.tiny import build_tiny_random

        loaded = build_tiny_random()
        loaded.model.to(dtype)
        return loaded
    if Path(name_or_path).is_dir():
        log.info("loading local model directory %s", name_or_path)
        return _from_dir(name_or_path, name_or_path, dtype)
    return _from_hub(name_or_path, dtype)


def emulator_layers(depth: int, keep: int) -> list[int]:
    """`keep` evenly spaced layer indices of `depth`, first and last included."""
    if not 1 <= keep <= depth:
        raise ValueError(f"an emulator keeps 1..{depth} layers, not {keep}")
    if keep == 1:
        return [0]
    return sorted({round(i * (depth - 1) / (keep - 1)) for i in range(keep)})


def load_emulator(name: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """`emulator:K:BASE`: BASE loaded, then cut to K layers (see `emulator_layers`)."""
    _, keep, base = name.split(":", 2) if name.count(":") >= 2 else (None, "", "")
    if not keep.isdigit() or not base:
        raise UnknownModelError(f"{name!r}: write an emulator as emulator:K:BASE, "
                                "e.g. emulator:6:qwen2.5-coder-1.5b")
    loaded = load_model(base, dtype=dtype)
    arch.keep_layers(loaded.model, emulator_layers(loaded.num_layers, int(keep)))
    return finalize(loaded.model, loaded.tokenizer, name)


def _config_of(name_or_path: str):
    """The model's config without its weights, where it is on disk (registry, local dir)."""
    from transformers import AutoConfig

    if name_or_path.startswith(EMULATOR_PREFIX):
        return None  # fewer layers than its base: the base's estimate would over-refuse
    if name_or_path in REGISTRY:
        return AutoConfig.from_pretrained(str(ensure_cached(REGISTRY[name_or_path])))
    if name_or_path != TINY_RANDOM and Path(name_or_path).is_dir():
        return AutoConfig.from_pretrained(name_or_path)
    return None


def load_placed(name_or_path: str = DEFAULT_MODEL, *, dtype: str = "auto",
                device: str = "auto", batch_size: int = 16) -> LoadedModel:
    """`load_model` on the device and in the dtype `--device` / `--dtype` ask for (`auto`:
    what the hardware has), refused up front when it would not fit in free memory."""
    placement = resolve_placement(dtype, device)
    config = _config_of(name_or_path)
    if config is not None:
        check_fits(name_or_path, estimate_memory(config, placement, batch_size), placement)
    log.info("%s on %s in %s (%s)", name_or_path, placement.device, placement.dtype,
             placement.reason)
    loaded = load_model(name_or_path, dtype=placement.torch_dtype)
    if placement.device != "cpu":
        loaded.model.to(placement.device)
    loaded.placement = placement
    return loaded
