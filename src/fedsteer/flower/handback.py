"""The run's record and artifacts back to whoever submitted it, through Flower's own channel.

On a real federation the ServerApp runs on the coordinator's machine, and open-source
Flower has no artifact store (`flwr pull` needs a provider the SuperLink does not have). What
it does carry back, over the same TLS link, is the ServerApp's output: `flwr run --stream`
prints it on the submitter's terminal. So the ServerApp prints its result folder
(`result.json` and the saved artifacts) as a gzipped tar in numbered base64 lines, and the
submitter rebuilds the folder from its `flwr run` log. Nothing else travels this way.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import tarfile
from pathlib import Path

MARK = "fedsteer-handback"
CHUNK = 1800  # characters of base64 per line: far below any log line limit
ARTIFACTS = "artifacts"
_LINE = re.compile(rf"{MARK} (\d+)/(\d+) ([A-Za-z0-9+/=]+)")


class HandbackMissing(RuntimeError):
    """The log holds no complete handback (the run failed, or its output was cut)."""


def handback_lines(result_dir: Path, files: list[str]) -> list[str]:
    """`files` (paths relative to `result_dir`, a folder as a whole) as numbered lines."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in files:
            if (result_dir / name).exists():
                tar.add(result_dir / name, arcname=name)
    text = base64.b64encode(buffer.getvalue()).decode()
    chunks = [text[i:i + CHUNK] for i in range(0, len(text), CHUNK)] or [""]
    return [f"{MARK} {i + 1}/{len(chunks)} {chunk}" for i, chunk in enumerate(chunks)]


def emit(result_dir: Path, with_artifacts: bool) -> None:
    """Print the result folder for the submitter (the ServerApp's output is streamed)."""
    files = ["result.json"] + ([ARTIFACTS] if with_artifacts else [])
    for line in handback_lines(result_dir, files):
        print(line, flush=True)


def collect(log_text: str, out_dir: Path, save_dir: Path | None) -> None:
    """Rebuild `out_dir/result.json` (and `save_dir` from the artifacts) from a log."""
    chunks: dict[int, str] = {}
    total = None
    for match in _LINE.finditer(log_text):
        index, count = int(match.group(1)), int(match.group(2))
        if total not in (None, count):  # a second run's handback in the same log: start over
            chunks.clear()
        total = count
        chunks[index] = match.group(3)
    if total is None or sorted(chunks) != list(range(1, total + 1)):
        raise HandbackMissing(f"the run's record did not come back ({len(chunks)} of "
                              f"{total or '?'} parts in the log)")
    data = base64.b64decode("".join(chunks[i] for i in range(1, total + 1)))
    out_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
        tar.extractall(out_dir, members=members, filter="data")
    if save_dir is not None and (out_dir / ARTIFACTS).is_dir():
        save_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(out_dir / ARTIFACTS, save_dir)
