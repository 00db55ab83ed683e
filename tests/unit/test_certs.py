import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from shard.cli import main
from shard.wire.certs import (
    Identity,
    create_ca,
    create_deployment,
    identity_from_pem,
    issue,
)


def _cert(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_issue_puts_identity_and_hosts_in_sans(tmp_path):
    create_ca(tmp_path)
    cert_path, key_path = issue(
        tmp_path, role="stage", node_id="stage-0", hosts=["gpu1.example", "10.0.0.5", "::1"]
    )
    assert (cert_path, key_path) == (tmp_path / "stage-0.pem", tmp_path / "stage-0.key")
    cert = _cert(cert_path)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["shard://stage/stage-0"]
    # The identity as a DNS name too, which a dialling node verifies (open_channel(expect=)).
    assert san.get_values_for_type(x509.DNSName) == ["stage-0.stage.shard.internal", "gpu1.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("::1")
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(_cert(tmp_path / "ca.pem"))
    assert identity_from_pem(cert_path.read_bytes()) == Identity("stage", "stage-0")


def test_default_hosts_are_loopback(tmp_path):
    create_ca(tmp_path)
    cert_path, _ = issue(tmp_path, role="client", node_id="client")
    san = _cert(cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["client.client.shard.internal", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_key_files_are_private(tmp_path):
    create_ca(tmp_path)
    _, key_path = issue(tmp_path, role="registry", node_id="registry")
    assert _mode(tmp_path / "ca.key") == 0o600
    assert _mode(key_path) == 0o600
    assert _mode(tmp_path / "ca.pem") == 0o644


def test_create_ca_refuses_to_overwrite(tmp_path):
    create_ca(tmp_path)
    before = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(FileExistsError):
        create_ca(tmp_path)
    assert (tmp_path / "ca.pem").read_bytes() == before
    create_ca(tmp_path, overwrite=True)
    assert (tmp_path / "ca.pem").read_bytes() != before


@pytest.mark.parametrize("node_id", ["", "a/b", "../ca", "x" * 65, "has space", "ünï", "a\n"])
def test_invalid_node_ids_are_rejected(tmp_path, node_id):
    create_ca(tmp_path)
    with pytest.raises(ValueError):
        issue(tmp_path, role="stage", node_id=node_id)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.key", "ca.pem"]


def test_invalid_role_is_rejected(tmp_path):
    create_ca(tmp_path)
    with pytest.raises(ValueError):
        issue(tmp_path, role="admin", node_id="x")
    issue(tmp_path, role="stage", node_id="A.b_c-" + "9" * 58)  # 64 chars is fine


def test_identity_from_pem_without_shard_uri(tmp_path):
    create_ca(tmp_path)
    assert identity_from_pem((tmp_path / "ca.pem").read_bytes()) is None


def test_create_deployment_keeps_existing_ca(tmp_path):
    create_deployment(tmp_path, [("coordinator", "coord")])
    ca = (tmp_path / "ca.pem").read_bytes()
    create_deployment(tmp_path, [("stage", "s0"), ("stage", "s1")], hosts=["node.lan"])
    assert (tmp_path / "ca.pem").read_bytes() == ca
    assert identity_from_pem((tmp_path / "s1.pem").read_bytes()) == Identity("stage", "s1")
    with pytest.raises(ValueError):
        create_deployment(tmp_path, [("stage", "dup"), ("client", "dup")])
    assert not (tmp_path / "dup.pem").exists()


def test_cli_local_writes_a_whole_deployment(tmp_path, capsys):
    d = tmp_path / "certs"
    assert main(["certs", "local", str(d), "--stages", "2"]) == 0
    nodes = ["registry", "coordinator", "stage-0", "stage-1", "client"]
    expected = {"ca.pem", "ca.key", "deployment.secret"} | {f"{n}.{ext}" for n in nodes for ext in ("pem", "key")}
    assert {p.name for p in d.iterdir()} == expected  # no temp files left behind
    assert (d / "deployment.secret").stat().st_mode & 0o777 == 0o600
    assert identity_from_pem((d / "stage-1.pem").read_bytes()) == Identity("stage", "stage-1")
    assert identity_from_pem((d / "client.pem").read_bytes()) == Identity("client", "client")
    out = capsys.readouterr().out
    assert all(f"wrote {d / name}" in out for name in expected)


def test_cli_init_and_issue(tmp_path, capsys):
    assert main(["certs", "init", str(tmp_path)]) == 0
    assert main(["certs", "init", str(tmp_path)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["certs", "issue", str(tmp_path), "--role", "stage", "--id", "s9", "--host", "10.1.2.3"]) == 0
    san = _cert(tmp_path / "s9.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert san.get_values_for_type(x509.DNSName) == ["s9.stage.shard.internal"]


@pytest.mark.parametrize("identity, name", [
    (Identity("stage", "stage-1"), "stage-1.stage.shard.internal"),
    (Identity("registry", "registry"), "registry.registry.shard.internal"),
    # Not a lowercase DNS label: encoded, so that ids differing only in case stay apart.
    (Identity("stage", "Stage-1"), "x--kn2gcz3ffuyq.stage.shard.internal"),
    (Identity("stage", "stage_1"), "x--on2gcz3fl4yq.stage.shard.internal"),
    (Identity("coordinator", "x--a"), "x--paws2yi.coordinator.shard.internal"),
])
def test_identity_dns_name(identity, name):
    assert identity.dns_name == name


def test_a_long_odd_id_gives_valid_dns_labels():
    name = Identity("stage", "A" * 64).dns_name
    labels = name.split(".")
    assert len(name) <= 253 and all(0 < len(label) <= 63 for label in labels)
    assert labels[-3:] == ["stage", "shard", "internal"]


@pytest.mark.parametrize("host", ["stage-1.stage.shard.internal", "*.stage.shard.internal", "SHARD.INTERNAL"])
def test_a_host_in_the_identity_domain_is_refused(tmp_path, host):
    create_ca(tmp_path)
    with pytest.raises(ValueError, match="names node identities"):
        issue(tmp_path, role="stage", node_id="stage-0", hosts=[host])
