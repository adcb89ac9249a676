"""Throwaway TLS certificates for tests, made with the ``openssl`` command line tool.

Why the CLI: the ``cryptography`` package is not a dependency, while ``openssl`` is on
every machine that has the Debian ``rabbitmq-server`` package (it depends on it). The keys
are ECDSA P-256 (instant to generate, unlike RSA) and live only in a pytest temp dir.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from toposerve.deploy.local_services import TlsFiles

__all__ = ["TlsFiles", "make_ca", "make_server_cert", "missing_tls_support"]

_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
# The extensions a strict verifier (Python 3.13's default VERIFY_X509_STRICT, Erlang)
# expects: a CA marked as such, key identifiers, a leaf usable for TLS servers only.
_SERVER_EXTENSIONS = (
    "basicConstraints = critical, CA:FALSE\n"
    "keyUsage = critical, digitalSignature\n"
    "extendedKeyUsage = serverAuth\n"
    "subjectKeyIdentifier = hash\n"
    "authorityKeyIdentifier = keyid, issuer\n"
    "subjectAltName = {san}\n"
)


def _openssl(*args: str | Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise RuntimeError("the openssl command line tool is needed to make test certificates")
    result = subprocess.run([binary, *map(str, args)], capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed ({result.returncode}): {result.stderr.strip()}")


def make_ca(directory: Path, name: str = "ca") -> tuple[Path, Path]:
    """A self-signed CA, valid for two days: returns (certificate, key) PEM paths."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req", "-x509", *_EC_KEY, "-keyout", key, "-out", cert, "-days", "2",
        "-subj", f"/CN=toposerve throwaway test CA {name}",
        "-addext", "basicConstraints = critical, CA:TRUE",
        "-addext", "keyUsage = critical, keyCertSign, cRLSign",
        "-addext", "subjectKeyIdentifier = hash",
    )  # fmt: skip
    return cert, key


def make_server_cert(
    directory: Path, ca: tuple[Path, Path], hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> TlsFiles:
    """A server certificate signed by ``ca`` for ``hosts`` (IP addresses and DNS names)."""
    ca_cert, ca_key = ca
    cert, key, csr, ext = (directory / f"server.{suffix}" for suffix in ("pem", "key", "csr", "ext"))
    san = ", ".join(f"IP:{h}" if h.replace(".", "").isdigit() or ":" in h else f"DNS:{h}" for h in hosts)
    ext.write_text(_SERVER_EXTENSIONS.format(san=san))
    _openssl("req", "-new", *_EC_KEY, "-keyout", key, "-out", csr, "-subj", f"/CN={hosts[0]}")
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-set_serial", "1",
        "-days", "2", "-extfile", ext, "-out", cert,
    )  # fmt: skip
    return TlsFiles(ca=ca_cert, cert=cert, key=key)


def missing_tls_support(error: str, server: str) -> str | None:
    """Why ``server`` cannot serve TLS at all (a build without it), judged from its failed
    start (``error``); None when the failure is anything else, which must fail the test."""
    if server == "redis":
        # Redis <= 7.0 built without TLS does not know the directive; 7.2+ says so.
        if "Failed finding TLS support" in error or ("Bad directive" in error and "tls-port" in error):
            return "this redis-server was built without TLS support (BUILD_TLS=no)"
        return None
    # RabbitMQ's TLS listener is Erlang's ssl application (Debian: erlang-ssl, a dependency
    # of rabbitmq-server, so normally present); ask the Erlang runtime whether it has it.
    erl = shutil.which("erl")
    if erl is None:
        return None
    probe = subprocess.run(
        [erl, "-noshell", "-eval", "halt(case code:lib_dir(ssl) of {error, _} -> 3; _ -> 0 end)."],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    if probe.returncode == 3:
        return f"the Erlang runtime ({erl}) has no ssl application (install erlang-ssl)"
    return None
