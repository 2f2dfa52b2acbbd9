"""Where a model runs and in which dtype: `--device`, `--dtype`, and what `auto` picks.

`auto` follows the hardware: a GPU when there is one (bfloat16 where it supports it), else
the CPU, in bfloat16 only where a probe finds bfloat16 matmuls faster than float32 there.
A CPU without bf16 instructions runs bfloat16 through a reference kernel dozens of times
slower (pytorch/pytorch#146508), so flags alone do not decide: with `amx_bf16` or
`avx512_bf16` present, a timed matmul of a 0.5B model's MLP shape does, once per CPU and
torch version (cached in the user cache dir). The choice and its reason go into the record.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedsteer.settings import cache_dir

__all__ = [
    "DEVICES", "DTYPES", "CpuBf16Probe", "MemoryEstimate", "ModelTooLargeError", "Placement",
    "PlacementError", "check_fits", "cpu_bf16_probe", "estimate_memory", "resolve_placement",
    "torch_dtype",
]

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "mps")
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: CPU flags of bf16 units: AMX tiles (Sapphire Rapids+) or AVX-512 BF16 dot products
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
#: bfloat16 must beat float32 by this much on the probe to be worth its rounding
MIN_SPEEDUP = 1.3
#: the probe's matmul: 16 rows x 48 tokens through qwen2.5-0.5b's MLP up-projection
PROBE_SHAPE = (768, 896, 4864)


class PlacementError(ValueError):
    """A device or dtype this machine cannot give (e.g. `--device cuda` without a GPU)."""


@dataclass(frozen=True)
class Placement:
    """The device and dtype a model runs in, and why (what the record and table show)."""

    device: str
    dtype: str
    reason: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype]

    def as_record(self) -> dict[str, str]:
        return asdict(self)


def torch_dtype(name: str) -> torch.dtype:
    """`float32` / `bfloat16` / `float16` as a torch dtype."""
    return _TORCH_DTYPES[name]


@dataclass(frozen=True)
class CpuBf16Probe:
    """What the probe found on this CPU: its bf16 flags and the bf16 vs float32 speed-up."""

    cpu: str
    flags: tuple[str, ...]
    speedup: float | None  # float32 seconds / bfloat16 seconds; None: not timed (no flags)
    torch_version: str

    @property
    def use_bf16(self) -> bool:
        return self.speedup is not None and self.speedup >= MIN_SPEEDUP

    def why(self) -> str:
        if not self.flags:
            return f"cpu without {' or '.join(BF16_FLAGS)}"
        timed = f"{'+'.join(self.flags)}, bf16 matmul {self.speedup:.1f}x float32"
        return timed if self.use_bf16 else f"{timed} (< {MIN_SPEEDUP}x)"


def _cpuinfo() -> tuple[str, set[str]]:
    """This CPU's model name and flags (Linux /proc/cpuinfo; elsewhere none are known)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return name, flags


def time_matmul(dtype: torch.dtype, shape: tuple[int, int, int] = PROBE_SHAPE,
                repeats: int = 3) -> float:
    """Best-of-`repeats` seconds of one `[m, k] @ [k, n]` matmul in `dtype` on the CPU."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen, device="cpu").to(dtype)
    b = torch.randn(k, n, generator=gen, device="cpu").to(dtype)
    a @ b  # warm-up: oneDNN builds its kernel on first use
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return best


def _probe_path() -> Path:
    return cache_dir() / "probe" / "cpu-bf16.json"


def cpu_bf16_probe(timer: Callable[[torch.dtype], float] = time_matmul) -> CpuBf16Probe:
    """Has this CPU bf16 units worth using? Read from the cache, else measured once."""
    cpu, flags = _cpuinfo()
    present = tuple(f for f in BF16_FLAGS if f in flags)
    path = _probe_path()
    try:
        cached = CpuBf16Probe(**{**json.loads(path.read_text()), "flags": present})
        if cached.cpu == cpu and cached.torch_version == torch.__version__:
            return cached
    except (OSError, ValueError, TypeError):
        pass
    speedup = None
    if present:
        speedup = timer(torch.float32) / timer(torch.bfloat16)
    probe = CpuBf16Probe(cpu, present, speedup, torch.__version__)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(probe)))
    except OSError as err:  # a read-only cache only costs the probe again next time
        log.debug("could not cache the bf16 probe: %s", err)
    return probe


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def _device(requested: str) -> tuple[str, str]:
    """The device, and why when `auto` chose it."""
    if requested not in DEVICES:
        raise PlacementError(f"--device {requested!r}: choose one of {', '.join(DEVICES)}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise PlacementError("--device cuda: torch sees no CUDA GPU here (torch "
                             f"{torch.__version__}); use --device cpu or auto")
    if requested == "mps" and not _mps_available():
        raise PlacementError("--device mps: this machine has no Apple GPU torch can use")
    if requested != "auto":
        return requested, requested
    if torch.cuda.is_available():
        return "cuda", f"cuda ({torch.cuda.get_device_name(0)})"
    if _mps_available():
        return "mps", "mps"
    return "cpu", "cpu"


def _auto_dtype(device: str, probe: Callable[[], CpuBf16Probe]) -> tuple[str, str]:
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "gpu supports bf16"
        return "float32", "gpu without bf16"
    if device == "mps":
        return "float32", "bf16 not probed on mps"
    found = probe()
    return ("bfloat16" if found.use_bf16 else "float32"), found.why()


def resolve_placement(dtype: str = "auto", device: str = "auto", *,
                      probe: Callable[[], CpuBf16Probe] | None = None) -> Placement:
    """The device and dtype `--device` / `--dtype` ask for, `auto` decided here; the reason
    reads e.g. `auto: cpu without amx_bf16 or avx512_bf16 → float32`."""
    if dtype not in DTYPES:
        raise PlacementError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    chosen_device, device_why = _device(device)
    if dtype != "auto":
        return Placement(chosen_device, dtype, f"{dtype} asked on {device_why}")
    chosen, why = _auto_dtype(chosen_device, probe or cpu_bf16_probe)
    return Placement(chosen_device, chosen, f"auto: {device_why}, {why} → {chosen}")


# ------------------------------------------------------------------ memory before loading
#: tokens a row is assumed to hold when estimating activations (ICL prompts stay below)
ESTIMATE_TOKENS = 512
#: headroom kept free for the rest of the process (tokenizer, data, Python, allocator)
HEADROOM_BYTES = 512 * 1024**2


class ModelTooLargeError(MemoryError):
    """The model and one batch's activations would not fit in the device's free memory."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model needs on its device: weights, one batch's activations, and what is free."""

    parameters: int
    weight_bytes: int
    activation_bytes: int
    available_bytes: int | None  # None: unknown on this device (then nothing is refused)

    @property
    def needed_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + HEADROOM_BYTES

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.needed_bytes <= self.available_bytes


def count_parameters(config) -> int:
    """Parameters of a transformers config's causal LM, built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def activation_bytes(config, dtype: torch.dtype, batch_size: int,
                     tokens: int = ESTIMATE_TOKENS) -> int:
    """One forward's live activations (a few hidden-size tensors, the MLP's widest, the KV
    cache of every layer) and its float32 logits at the last position."""
    hidden = int(config.hidden_size)
    wide = int(getattr(config, "intermediate_size", 4 * hidden))
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_dim = int(getattr(config, "num_key_value_heads", heads)) * (hidden // heads)
    per_token = 4 * hidden + 2 * wide + 2 * layers * kv_dim
    size = torch.finfo(dtype).bits // 8
    return batch_size * tokens * per_token * size + batch_size * int(config.vocab_size) * 4


def available_bytes(device: str) -> int | None:
    """Free memory where the model goes: the GPU's, or the machine's for the CPU."""
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    if device == "cpu":
        import psutil

        return int(psutil.virtual_memory().available)
    return None


def head_copy_bytes(config, dtype: torch.dtype) -> int:
    """The float32 copy of the LM head a 16-bit model computes its logits with
    (`models.load.float32_head`)."""
    if dtype == torch.float32:
        return 0
    return int(config.vocab_size) * int(config.hidden_size) * 4


def estimate_memory(config, placement: Placement, batch_size: int,
                    available: int | None = None) -> MemoryEstimate:
    params = count_parameters(config)
    dtype = placement.torch_dtype
    return MemoryEstimate(
        parameters=params,
        weight_bytes=params * (torch.finfo(dtype).bits // 8) + head_copy_bytes(config, dtype),
        activation_bytes=activation_bytes(config, dtype, batch_size),
        available_bytes=available if available is not None else available_bytes(
            placement.device),
    )


def check_fits(name: str, estimate: MemoryEstimate, placement: Placement) -> None:
    """Refuse, in one line, a model that would swap or be killed instead of running."""
    if estimate.fits:
        return
    gb = 1024**3
    smaller = " or --dtype bfloat16" if placement.dtype == "float32" else ""
    raise ModelTooLargeError(
        f"{name} needs ≈ {estimate.needed_bytes / gb:.1f} GB on {placement.device} in "
        f"{placement.dtype} ({estimate.parameters / 1e9:.2f} B parameters = "
        f"{estimate.weight_bytes / gb:.1f} GB, one batch's activations "
        f"{estimate.activation_bytes / gb:.1f} GB, {HEADROOM_BYTES // 1024**2} MB headroom) "
        f"but {estimate.available_bytes / gb:.1f} GB are free: use a smaller model, a smaller "
        f"--batch-size{smaller}"
    )
