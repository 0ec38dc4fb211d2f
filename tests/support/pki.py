"""Test certificates made with ``cryptography``: a CA and certificates it (or another CA) signs.

The same recipe as the ``pki`` fixtures of tests/test_security.py and tests/test_audit.py
(EC P-256, SHA-256), as a plain function other tests can call.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path


class Pki:
    """Files under ``folder``: ``ca`` (the CA certificate) and ``issue(cn)`` -> (key, cert) paths."""

    def __init__(self, folder: Path, name: str = "ct-triage test CA"):
        from cryptography.hazmat.primitives.asymmetric import ec

        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._ca_name = name
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        _, self.ca = self._write(name, self._ca_key, self._sign(name, self._ca_key.public_key(), ca=True,
                                                                hosts=()))

    def _sign(self, cn: str, public_key, *, ca: bool, hosts, days=(-1, 30)):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self._ca_name)]))
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now + datetime.timedelta(days=days[0]))
                   .not_valid_after(now + datetime.timedelta(days=days[1]))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self._ca_key, hashes.SHA256())

    def _write(self, cn: str, key, cert) -> tuple[Path, Path]:
        from cryptography.hazmat.primitives import serialization

        stem = cn.replace(" ", "-")
        key_path, cert_path = self.folder / f"{stem}.key", self.folder / f"{stem}.pem"
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return key_path, cert_path

    def issue(self, cn: str, hosts=("localhost", "127.0.0.1"), days=(-1, 30)) -> tuple[Path, Path]:
        """(key, certificate) of ``cn``, valid for ``hosts`` (DNS names or IP addresses)."""
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        return self._write(cn, key, self._sign(cn, key.public_key(), ca=False, hosts=hosts, days=days))
