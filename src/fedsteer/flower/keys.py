"""A federation's keys and certificates, made with `cryptography` (no crypto of our own).

`init_federation` writes one folder: a CA, the coordinator's TLS certificate for the names
and addresses the parties dial (subjectAltName), one EC P-384 key pair per party in the
OpenSSH format Flower's SuperNode authentication reads (`--auth-supernode-private-key`,
`flwr supernode register`), `federation.toml` (the coordinator's address) and a README that
says which file goes to which machine. Private keys are created 0600 and never printed.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "coordinator.crt", "coordinator.key"
FEDERATION_FILE = "federation.toml"
DEFAULT_PORT = 9092
#: how long the certificates are valid; a federation re-runs `init` (or its CA) after that
VALIDITY = datetime.timedelta(days=365)


def party_key(index: int) -> str:
    return f"party-{index}.key"


def party_public_key(index: int) -> str:
    return f"party-{index}.pub"


@dataclass(frozen=True)
class Federation:
    """What `federation.toml` says: where the coordinator listens and how many parties."""

    folder: Path
    address: str
    parties: int

    @property
    def ca_cert(self) -> Path:
        return self.folder / CA_CERT

    def public_keys(self) -> list[Path]:
        return [self.folder / party_public_key(i) for i in range(self.parties)]


def read_federation(folder: Path) -> Federation:
    """The federation in `folder`, or a one-line error naming what is missing."""
    path = Path(folder) / FEDERATION_FILE
    if not path.is_file():
        raise ValueError(f"{path} not found: make the folder with `fedsteer federation init`")
    values = tomllib.loads(path.read_text())
    return Federation(Path(folder).resolve(), str(values["address"]), int(values["parties"]))


def init_federation(folder: Path, parties: int, hosts: list[str],
                    port: int = DEFAULT_PORT) -> Federation:
    """Write the CA, the coordinator's certificate and key, and each party's key pair."""
    if parties < 1:
        raise ValueError(f"--parties {parties}: a federation needs at least one party")
    if not hosts:
        raise ValueError("--host: name at least one DNS name or IP address of the coordinator")
    folder = Path(folder)
    if (folder / CA_KEY).exists():
        raise ValueError(f"{folder / CA_KEY} exists: this folder already holds a federation; "
                         "use another folder (overwriting would lock its parties out)")
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _ca_certificate(ca_key)
    _write_private(folder / CA_KEY, _pem_private(ca_key))
    (folder / CA_CERT).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _server_certificate(server_key, hosts, ca_key, ca_cert)
    _write_private(folder / SERVER_KEY, _pem_private(server_key))
    (folder / SERVER_CERT).write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    for index in range(parties):
        write_party_keys(folder, index)
    address = f"{_dial_form(hosts[0])}:{port}"
    (folder / FEDERATION_FILE).write_text(tomli_w.dumps({"address": address,
                                                         "parties": parties}))
    (folder / "README.txt").write_text(readme(parties, address))
    return Federation(folder.resolve(), address, parties)


def write_party_keys(folder: Path, index: int) -> None:
    """An EC P-384 key pair in OpenSSH format, as `ssh-keygen -t ecdsa -b 384` writes it."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    _write_private(folder / party_key(index), private)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    (folder / party_public_key(index)).write_bytes(public + f" party-{index}\n".encode())


def _write_private(path: Path, data: bytes) -> None:
    """Created 0600 from the first byte: the key is never readable by others, not even briefly."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY))


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = _name("fedsteer federation CA")
    return (_builder(name, name, key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA384()))


def _server_certificate(key, hosts: list[str], ca_key, ca_cert) -> x509.Certificate:
    names = [_general_name(h) for h in hosts]
    return (_builder(_name(hosts[0]), ca_cert.subject, key)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _dial_form(host: str) -> str:
    """An IPv6 address in brackets, as `host:port` needs it."""
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def readme(parties: int, address: str) -> str:
    each_party = "\n".join(
        f"  party {i}'s machine    ca.crt, party-{i}.key (secret)  -> fedsteer party "
        f"--coordinator {address} --ca ca.crt --key party-{i}.key --task T --data ROWS"
        for i in range(parties))
    return f"""\
A fedsteer federation: the coordinator at {address} and {parties} parties (0..{parties - 1}).

Which file goes where (files ending .key are SECRET: copy each only to its own machine,
over a channel you trust, and delete the copy here once it has arrived):

  coordinator machine  coordinator.crt, coordinator.key (secret), ca.crt, federation.toml,
                       party-*.pub (the parties' public keys, registered at start)
                                                -> fedsteer coordinator FOLDER
{each_party}
  whoever submits runs ca.crt, federation.toml  -> fedsteer run METHOD --federation FOLDER
  nobody               ca.key (secret): keep it offline; it only signs new certificates

A party whose key is lost or leaked: make a new pair, register its .pub with
`flwr supernode register` (FLWR_HOME=FOLDER/flwr-home) and unregister the old one.
"""
