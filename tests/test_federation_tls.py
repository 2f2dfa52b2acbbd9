"""A federation for real (issue 42): Flower's TLS and SuperNode authentication on loopback.

The fast tests check what `federation init` writes (modes, SAN, key formats, nothing secret
on stdout) and a party's checks before it connects. The slow ones start a coordinator
(SuperLink, TLS + node auth, its database in the federation folder) and one SuperNode per
party, each with its own CSV, and submit runs over TLS as a user would.
"""

from __future__ import annotations

import csv
import ipaddress
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)
from typer.testing import CliRunner

from fedsteer.cli import app
from fedsteer.eval.record import read_result
from fedsteer.experiment import RunConfig, build_clients, run_experiment
from fedsteer.flower import deploy, handback, keys
from fedsteer.flower.launch import flower_processes, free_port, run_on_flower

IFED = {"rounds": 1, "local_epochs": 1, "demos_per_class": 1, "calibration_per_class": 2}
LORA = {"rounds": 1, "rank": 2, "local_examples": 4, "batch_size": 2}
OPTIONS = {"ifed-icl": IFED, "fedavg-lora": LORA}
runner = CliRunner()


def tiny_config(method: str = "ifed-icl", **overrides) -> RunConfig:
    fields = {"method": method, "task": "sst2", "model": "tiny-random", "clients": 3,
              "test_size": 20, "options": dict(OPTIONS[method]), "client_batch": 1}
    return RunConfig(**{**fields, **overrides})


def make_federation(folder: Path, parties: int = 3) -> keys.Federation:
    return keys.init_federation(folder, parties, ["localhost", "127.0.0.1"], free_port())


# ------------------------------------------------------------------ init (fast)
def test_init_writes_private_keys_0600_and_prints_no_secret(tmp_path):
    folder = tmp_path / "fed"
    result = runner.invoke(app, ["federation", "init", str(folder), "--parties", "3",
                                 "--host", "coord.example.org,10.0.0.7"])
    assert result.exit_code == 0, result.output
    secret_files = ["ca.key", "coordinator.key", "party-0.key", "party-1.key", "party-2.key"]
    for name in secret_files:
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
        body = (folder / name).read_text().splitlines()[1]  # a line of the key itself
        assert body not in result.output, f"{name} printed"
    for name in ["ca.crt", "coordinator.crt", "party-0.pub", "README.txt", "federation.toml"]:
        assert (folder / name).is_file(), name
    assert "party-2.key" in (folder / "README.txt").read_text()
    assert not (folder / "party-3.key").exists()


def test_the_coordinator_certificate_names_every_host_and_is_signed_by_the_ca(tmp_path):
    keys.init_federation(tmp_path, 1, ["coord.example.org", "10.0.0.7", "::1"], 9400)
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "coordinator.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coord.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7"),
                                                        ipaddress.ip_address("::1")]
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert keys.read_federation(tmp_path).address == "coord.example.org:9400"


def test_party_keys_are_openssh_ec_keys_flower_reads(tmp_path):
    """The format `ssh-keygen -t ecdsa -b 384` writes: what flower-supernode's
    `--auth-supernode-private-key` and `flwr supernode register` load."""
    keys.init_federation(tmp_path, 2, ["localhost"])
    private = load_ssh_private_key((tmp_path / "party-1.key").read_bytes(), None)
    public = load_ssh_public_key((tmp_path / "party-1.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    assert public.public_numbers() == private.public_key().public_numbers()
    assert (tmp_path / "party-1.key").read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY")
    assert (tmp_path / "party-1.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    load_pem_private_key((tmp_path / "coordinator.key").read_bytes(), None)


def test_init_refuses_to_overwrite_a_federation(tmp_path):
    keys.init_federation(tmp_path, 1, ["localhost"])
    before = (tmp_path / "ca.key").read_bytes()
    result = runner.invoke(app, ["federation", "init", str(tmp_path), "--parties", "1",
                                 "--host", "localhost"])
    assert result.exit_code == 2 and "already holds a federation" in result.output
    assert (tmp_path / "ca.key").read_bytes() == before


# ------------------------------------------------------------------ party checks (fast)
def write_rows(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def test_a_bad_row_stops_the_party_before_it_connects(tmp_path, monkeypatch):
    federation = make_federation(tmp_path / "fed", 1)
    rows = write_rows(tmp_path / "rows.csv", [("fine film", "positive"), ("meh", "so-so")])
    contacted = []
    monkeypatch.setattr(deploy, "check_coordinator", lambda *a, **k: contacted.append(a))
    result = runner.invoke(app, ["party", "--coordinator", federation.address,
                                 "--ca", str(federation.ca_cert),
                                 "--key", str(federation.folder / "party-0.key"),
                                 "--task", "sst2", "--data", str(rows)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "rows.csv" in lines[0] and "line 3" in lines[0] and "'label'" in lines[0]
    assert not contacted


def test_a_party_says_what_leaves_its_machine(tmp_path, monkeypatch):
    federation = make_federation(tmp_path / "fed", 1)
    rows = write_rows(tmp_path / "rows.csv", [("fine film", "positive")])
    monkeypatch.setattr(deploy, "run_party", lambda party: "the party stopped")
    monkeypatch.setattr(deploy, "check_coordinator", lambda *a, **k: None)
    result = runner.invoke(app, ["party", "--coordinator", federation.address,
                                 "--ca", str(federation.ca_cert),
                                 "--key", str(federation.folder / "party-0.key"),
                                 "--task", "sst2", "--data", str(rows)])
    assert result.exit_code == 0, result.output
    assert "ifed-icl" in result.output and "fedavg-lora" in result.output
    assert "never leave" in result.output


def test_the_record_and_artifacts_come_back_whole_through_a_log(tmp_path):
    result_dir = tmp_path / "coordinator-side"
    (result_dir / handback.ARTIFACTS).mkdir(parents=True)
    (result_dir / "result.json").write_text('{"metrics": {"accuracy": 0.5}}')
    (result_dir / handback.ARTIFACTS / "coef.safetensors").write_bytes(os.urandom(20_000))
    lines = handback.handback_lines(result_dir, ["result.json", handback.ARTIFACTS])
    assert len(lines) > 2 and all(len(line) < 2000 for line in lines)
    log_text = "INFO : noise\n" + "\n".join(f"INFO : {line}" for line in lines) + "\n"
    handback.collect(log_text, tmp_path / "out", tmp_path / "saved")
    assert (tmp_path / "out" / "result.json").read_text() == '{"metrics": {"accuracy": 0.5}}'
    assert ((tmp_path / "saved" / "coef.safetensors").read_bytes()
            == (result_dir / handback.ARTIFACTS / "coef.safetensors").read_bytes())
    with pytest.raises(handback.HandbackMissing, match="2 of"):
        handback.collect("\n".join(lines[:2]), tmp_path / "again", None)


#: what the SuperLink logs when a SuperNode with an unregistered key tries to join
REFUSED_LINE = ("ERROR :     [/v1/fleet/activate-node][ApiError:2004] Attempted to register "
                "SuperNode with public key: b'{pem}', exception: No SuperNode found with the "
                "given public key.")


def test_a_refused_key_is_named_by_its_ssh_fingerprint(tmp_path):
    from cryptography.hazmat.primitives import serialization

    keys.init_federation(tmp_path, 1, ["localhost"])
    public = load_ssh_public_key((tmp_path / "party-0.pub").read_bytes())
    pem = public.public_bytes(serialization.Encoding.PEM,
                              serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    log_text = "\n".join([REFUSED_LINE.format(pem=pem.replace("\n", "\\n"))] * 2)
    fingerprint = deploy.key_fingerprint(public)
    assert deploy.refused_keys(log_text) == {fingerprint: 2}
    ssh_keygen = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "party-0.pub")],
                                capture_output=True, text=True, check=False)
    if ssh_keygen.returncode == 0:  # the fingerprint an operator gets for their key
        assert fingerprint in ssh_keygen.stdout


def test_flowers_exit_305_becomes_one_line_that_says_why(tmp_path):
    settings = deploy.PartySettings("c:1", tmp_path / "ca.crt", tmp_path / "party-2.key", 2,
                                    tmp_path / "rows.csv", "sst2", tmp_path)
    log_text = ("ERROR :     Exit Code: 305\nFailed to initialize the connection to the "
                "SuperLink.\n[code: 2004] Failed to activate SuperNode.\nThe SuperNode could "
                "not establish a connection to the SuperLink.\n")
    reason = deploy.party_exit_reason(305, log_text, settings)
    assert "not registered" in reason and "party-2.key" in reason and "\n" not in reason


def test_a_party_names_its_files_absolute_for_flowers_processes(tmp_path, monkeypatch):
    """The ClientApp runs in Flower's process, from another folder: a relative spec or data
    path given on the command line must reach it absolute."""
    (tmp_path / "spec.toml").write_text("x")
    (tmp_path / "rows.csv").write_text("x")
    monkeypatch.chdir(tmp_path)
    party = deploy.PartySettings("c:1", None, None, 0, Path("rows.csv"), "spec.toml", tmp_path)
    config = party.node_config()
    assert config["task"] == str(tmp_path / "spec.toml")
    assert config["data-file"] == str(tmp_path / "rows.csv")
    assert deploy.PartySettings("c:1", None, None, 0, Path("rows.csv"), "sst2",
                                tmp_path).node_config()["task"] == "sst2"


# ------------------------------------------------------------------ processes (slow)
def party_files(config: RunConfig, folder: Path) -> list[Path]:
    """Each client's rows of the in-process partition, as that party's own CSV."""
    from fedsteer.data import load_task

    task = load_task(config.task)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for client in build_clients(config, task, None, centralized=False):
        rows = [(ex.text, task.spec.labels[ex.label]) for ex in client.data]
        files.append(write_rows(folder / f"party-{client.cid}.csv", rows))
    return files


def party_settings(federation: keys.Federation, index: int, data: Path, work: Path,
                   **overrides) -> deploy.PartySettings:
    fields = {"coordinator": federation.address, "ca_cert": federation.ca_cert,
              "key": federation.folder / keys.party_key(index), "partition_id": index,
              "data_file": data, "task": "sst2", "work_dir": work, "max_wait": 60.0,
              "nodes_on_machine": 3}
    return deploy.PartySettings(**{**fields, **overrides})


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ifed-icl", "fedavg-lora"])
def test_three_parties_over_tls_match_the_in_process_run(tmp_path, method):
    config = tiny_config(method)
    expected = run_experiment(config, tmp_path / "inprocess")
    federation = make_federation(tmp_path / "fed")
    files = party_files(config, tmp_path / "rows")
    with deploy.coordinator(federation.folder, bind="127.0.0.1"), \
            flower_processes(tmp_path / "parties") as parties:
        for i, data in enumerate(files):
            deploy.start_party(parties, party_settings(federation, i, data, tmp_path), f"p{i}")
        started = time.monotonic()
        record = run_on_flower(config, tmp_path / "out", federation=federation.folder,
                               save_dir=tmp_path / "saved")
    assert record["metrics"] == expected["metrics"]
    assert record["costs"]["bytes_up"] == expected["costs"]["bytes_up"]
    assert (tmp_path / "out" / "result.json").is_file()  # back on the submitter's side
    assert (tmp_path / "saved" / "provenance.json").is_file()  # and the artifacts
    assert len(list((tmp_path / "saved").iterdir())) > 1
    assert record["federation"]["refused_nodes"] == []
    assert time.monotonic() - started < 400
    # test 4: no row of any party on the coordinator's disk (database, logs, its copy of the
    # record) nor in the record that came back
    rows = [text for path in files for text, _ in read_rows(path) if len(text) >= 30]
    assert len(rows) > 10
    leaked = [(row, where) for where in files_under(federation.folder, tmp_path / "out")
              for row in rows if row.encode() in where.read_bytes()]
    assert not leaked, leaked[:3]


def read_rows(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="") as rows:
        return [(row["text"], row["label"]) for row in csv.DictReader(rows)]


def files_under(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*") if p.is_file()]


def fingerprint(public_key_file: Path) -> str:
    return deploy.key_fingerprint(load_ssh_public_key(public_key_file.read_bytes()))


@pytest.mark.slow
def test_an_unregistered_key_is_refused_and_the_run_goes_on_naming_it(tmp_path):
    config = tiny_config("ifed-icl")
    federation = make_federation(tmp_path / "fed")
    stranger = make_federation(tmp_path / "stranger", 1)  # a key the coordinator never saw
    files = party_files(config, tmp_path / "rows")
    with deploy.coordinator(federation.folder, bind="127.0.0.1"), \
            flower_processes(tmp_path / "parties") as parties:
        for i, data in enumerate(files):
            deploy.start_party(parties, party_settings(federation, i, data, tmp_path), f"p{i}")
        intruder_settings = party_settings(federation, 0, files[0], tmp_path,
                                           key=stranger.folder / "party-0.key")
        intruder = deploy.start_party(parties, intruder_settings, "intruder")
        # submitted as a user would: the table, and the record back here
        options = [arg for key, value in IFED.items() for arg in ("-o", f"{key}={value}")]
        result = runner.invoke(app, [
            "run", "ifed-icl", "--task", "sst2", "--model", "tiny-random", "--clients", "3",
            "--test-size", "20", "--client-batch", "1", *options,
            "--federation", str(federation.folder), "--out", str(tmp_path / "out")])
        assert result.exit_code == 0, result.output
        assert "ifed-icl" in result.output and "result.json" in result.output
        record = read_result(tmp_path / "out")
        assert intruder.wait(60) != 0  # it stopped by itself
        intruder_log = (tmp_path / "parties" / "intruder.log").read_text()
    reason = deploy.party_exit_reason(intruder.returncode, intruder_log, intruder_settings)
    assert "refused this party's key" in reason and "\n" not in reason
    assert record["metrics"]["num_clients"] == 3
    assert not [x for r in record["costs"]["rounds"] for x in r["rejected"]]
    refused = record["federation"]["refused_nodes"]
    assert [r["key"] for r in refused] == [fingerprint(stranger.folder / "party-0.pub")]


@pytest.mark.slow
def test_a_restarted_coordinator_readmits_its_parties_without_registering_again(tmp_path):
    config = tiny_config("ifed-icl")
    federation = make_federation(tmp_path / "fed")
    files = party_files(config, tmp_path / "rows")
    with flower_processes(tmp_path / "parties") as parties:
        with deploy.coordinator(federation.folder, bind="127.0.0.1") as first:
            assert first.registered == [f"party-{i}.pub: registered" for i in range(3)]
            for i, data in enumerate(files):
                deploy.start_party(parties, party_settings(federation, i, data, tmp_path,
                                                           max_wait=300.0), f"p{i}")

            def kill_mid_run():  # the coordinator dies once a party has a train message
                logs = [(tmp_path / "parties" / f"p{i}.log").read_text() for i in range(3)]
                if any("Receiving: train" in text for text in logs):
                    os.killpg(first.process.pid, signal.SIGKILL)
                    raise CoordinatorKilled

            with pytest.raises(CoordinatorKilled):
                run_on_flower(config, tmp_path / "lost", federation=federation.folder,
                              on_wait=kill_mid_run)
        with deploy.coordinator(federation.folder, bind="127.0.0.1") as second:
            assert second.registered == [f"party-{i}.pub: registered before" for i in range(3)]
            record = run_on_flower(config, tmp_path / "out", federation=federation.folder)
        assert all(node.poll() is None for node in parties.started)  # never restarted
    assert record["metrics"]["num_clients"] == 3
    assert not [x for r in record["costs"]["rounds"] for x in r["rejected"]]


class CoordinatorKilled(Exception):
    pass


@pytest.mark.slow
def test_a_party_that_trusts_another_ca_fails_with_one_line_and_sends_nothing(tmp_path):
    federation = make_federation(tmp_path / "fed", 1)
    other = make_federation(tmp_path / "other", 1)
    rows = write_rows(tmp_path / "rows.csv", [("fine film", "positive")])
    with deploy.coordinator(federation.folder, bind="127.0.0.1") as coordinator:
        result = runner.invoke(app, [
            "party", "--coordinator", federation.address, "--ca", str(other.ca_cert),
            "--key", str(federation.folder / "party-0.key"), "--task", "sst2",
            "--data", str(rows), "--work-dir", str(tmp_path / "party")])
        errors = [line for line in result.output.splitlines() if line.startswith("error")]
        assert result.exit_code == 2
        assert len(errors) == 1 and "not signed by" in errors[0], result.output
        assert not (tmp_path / "party" / "supernode.log").exists()  # no SuperNode started
        assert "activate-node" not in coordinator.log_path.read_text()


@pytest.mark.slow
def test_a_party_without_tls_against_a_tls_coordinator_fails_with_one_line(tmp_path):
    federation = make_federation(tmp_path / "fed", 1)
    rows = write_rows(tmp_path / "rows.csv", [("fine film", "positive")])
    with deploy.coordinator(federation.folder, bind="127.0.0.1") as coordinator:
        result = runner.invoke(app, [
            "party", "--coordinator", federation.address, "--insecure", "--partition-id", "0",
            "--task", "sst2", "--data", str(rows), "--work-dir", str(tmp_path / "party")])
        errors = [line for line in result.output.splitlines() if line.startswith("error")]
        assert result.exit_code == 2
        assert len(errors) == 1 and "speaks TLS" in errors[0], result.output
        assert not (tmp_path / "party" / "supernode.log").exists()
        assert "activate-node" not in coordinator.log_path.read_text()


@pytest.mark.slow
def test_a_tls_party_against_a_coordinator_without_tls_fails_with_one_line(tmp_path, caplog):
    federation = make_federation(tmp_path / "fed", 1)
    rows = write_rows(tmp_path / "rows.csv", [("fine film", "positive")])
    with deploy.coordinator(federation.folder, insecure=True, bind="127.0.0.1"):
        assert deploy.INSECURE_WARNING in caplog.text  # warned at every start
        result = runner.invoke(app, [
            "party", "--coordinator", federation.address, "--ca", str(federation.ca_cert),
            "--key", str(federation.folder / "party-0.key"), "--task", "sst2",
            "--data", str(rows), "--work-dir", str(tmp_path / "party")])
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert result.exit_code == 2
    assert len(errors) == 1 and "does not speak TLS" in errors[0], result.output
    assert not (tmp_path / "party" / "supernode.log").exists()



@pytest.mark.slow
def test_a_stopped_coordinator_leaves_no_flower_process_behind(tmp_path):
    """SIGTERM (a service manager's stop) used to kill `fedsteer coordinator` alone and leave
    its SuperLink, in a session of its own, running without it."""
    import psutil

    federation = make_federation(tmp_path / "fed", 1)
    command = subprocess.Popen(
        [str(Path(sys.executable).parent / "fedsteer"), "coordinator", str(federation.folder),
         "--bind", "127.0.0.1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in command.stdout:
            if "coordinator listening" in line:
                break
        children = psutil.Process(command.pid).children(recursive=True)
        assert any("flower-superlink" in " ".join(c.cmdline()) for c in children)
        command.send_signal(signal.SIGTERM)
        assert command.wait(60) == 0
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [p.cmdline()[:2] for p in alive]
    finally:
        if command.poll() is None:
            command.kill()
