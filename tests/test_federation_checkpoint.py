"""A round's checkpoint is one unit: a kill between any two file writes resumes to the
uninterrupted result, and a damaged checkpoint is a clear error naming the file."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict

from fedsteer.federation import InProcessRuntime
from fedsteer.federation import checkpoint as ckpt
from fedsteer.federation.checkpoint import CheckpointError
from test_federation_runtime import ToyAverage, final_w, make_clients


@dataclass
class Stateful(ToyAverage):
    """Each client also keeps a running count in its own state (checkpointed with it)."""

    name = "stateful"

    def client_step(self, message, client):
        seen = client.state["mine"]["n"].numpy() + 1 if "mine" in client.state else np.ones(1)
        client.state["mine"] = ArrayRecord({"n": Array(seen.astype(np.float32))})
        reply = super().client_step(message, client)
        reply["update"]["w"] = Array(reply["update"]["w"].numpy() + seen.astype(np.float32))
        return reply


class Killed(BaseException):
    """What SIGKILL looks like from inside the process: nothing after it runs."""


def _run(tmp_path, resume=False):
    env, clients = make_clients()
    runtime = InProcessRuntime(checkpoint_dir=tmp_path)
    return runtime.run(Stateful(), clients, env, resume=resume)


def _count_writes(tmp_path) -> int:
    counted = []
    real_write, real_rename = ckpt.atomic_write_bytes, ckpt.rename_into_place
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ckpt, "atomic_write_bytes", lambda *a: (counted.append(1), real_write(*a)))
        mp.setattr(ckpt, "rename_into_place", lambda *a: (counted.append(1), real_rename(*a)))
        _run(tmp_path)
    return len(counted)


def test_a_kill_between_any_two_writes_resumes_to_the_uninterrupted_result(tmp_path):
    expected = final_w(_run(tmp_path / "clean"))
    writes = _count_writes(tmp_path / "counted")
    assert writes > 20  # 4 rounds × (server 2 + 5 clients × 2 + progress + manifest + commit)
    real_write, real_rename = ckpt.atomic_write_bytes, ckpt.rename_into_place
    for kill_at in range(writes):
        folder = tmp_path / f"kill{kill_at}"
        calls = []

        def maybe_kill(real, *args, kill_at=kill_at, calls=calls):
            if len(calls) == kill_at:
                raise Killed
            calls.append(1)
            return real(*args)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ckpt, "atomic_write_bytes", lambda *a: maybe_kill(real_write, *a))
            mp.setattr(ckpt, "rename_into_place", lambda *a: maybe_kill(real_rename, *a))
            with pytest.raises(Killed):
                _run(folder)
        resumed = _run(folder, resume=True)
        assert len(resumed.rounds) == 4
        np.testing.assert_array_equal(final_w(resumed), expected, err_msg=f"kill {kill_at}")


def test_only_the_two_newest_rounds_are_kept(tmp_path):
    _run(tmp_path)
    assert [p.name for p in ckpt.round_dirs(tmp_path)] == ["round-0003", "round-0004"]
    assert not list(tmp_path.glob(".*partial"))


def test_past_round_9999_the_newest_rounds_are_kept_and_resumed(tmp_path):
    """`round-10000` sorts before `round-9999` as text: pruning deleted the newest round."""

    def write(folder):
        (folder / "marker.txt").write_text(folder.name)

    for done in (9998, 9999, 10000):
        ckpt.commit_round(tmp_path, done, write)
    assert [p.name for p in ckpt.round_dirs(tmp_path)] == ["round-9999", "round-10000"]
    assert ckpt.latest_round(tmp_path).name == "round-10000"


@pytest.mark.parametrize("victim", ["server.safetensors", "progress.json",
                                    "clients/client2.safetensors"])
def test_a_truncated_file_is_named_with_what_to_do(tmp_path, victim):
    _run(tmp_path)
    path = tmp_path / "round-0004" / victim
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(CheckpointError) as caught:
        _run(tmp_path, resume=True)
    message = str(caught.value)
    assert str(path) in message and "round-0003, the previous complete round" in message


def test_following_the_advice_resumes_from_the_previous_round(tmp_path):
    expected = final_w(_run(tmp_path / "clean"))
    _run(tmp_path)
    (tmp_path / "round-0004" / "server.json").write_text("{")
    import shutil

    shutil.rmtree(tmp_path / "round-0004")
    resumed = _run(tmp_path, resume=True)
    np.testing.assert_array_equal(final_w(resumed), expected)


def test_a_missing_manifest_is_named(tmp_path):
    _run(tmp_path)
    (tmp_path / "round-0004" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"round-0004/manifest\.json: unreadable"):
        _run(tmp_path, resume=True)


def test_load_recorddict_names_a_truncated_file(tmp_path):
    content = RecordDict({"a": ArrayRecord({"v": Array(np.arange(100, dtype=np.float32))})})
    ckpt.save_recorddict(content, tmp_path / "x")
    (tmp_path / "x.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError, match=r"x\.safetensors: unreadable"):
        ckpt.load_recorddict(tmp_path / "x")
