"""A token service for the real registry's bearer-token auth (distribution's ``auth.token``).

The registry trusts a self-signed certificate (``rootcertbundle``); this server on 127.0.0.1
checks basic credentials and answers ``{"token": JWT}``, an RS256 JWT whose ``x5c`` header
carries that certificate and whose ``access`` claim grants what the ``scope`` asked for.
"""

from __future__ import annotations

import base64
import datetime
import json
import time
import uuid
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from tests.threaded_app import ThreadedApp

SERVICE, ISSUER = "imgaccel-test-registry", "imgaccel-test-issuer"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    def __init__(self, workdir: Path, user: str, password: str) -> None:
        self.user, self.password = user, password
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imgaccel-test-token")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = workdir / "token-cert.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.requests = 0
        app = web.Application()
        app.router.add_get("/token", self._token)
        self._server = ThreadedApp(app)
        self.port = 0

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def registry_config(self) -> str:
        return (
            f"auth:\n  token:\n    realm: {self.realm}\n    service: {SERVICE}\n"
            f"    issuer: {ISSUER}\n    rootcertbundle: {self.cert_path}\n"
        )

    def start(self) -> TokenServer:
        self.port = self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def jwt(self, access: list[dict[str, object]]) -> str:
        der = self.cert.public_bytes(serialization.Encoding.DER)
        header = {"alg": "RS256", "typ": "JWT", "x5c": [base64.b64encode(der).decode()]}
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": self.user, "aud": SERVICE, "exp": now + 300, "nbf": now - 10, "iat": now,
                  "jti": uuid.uuid4().hex, "access": access}  # fmt: skip
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}".encode()
        signature = self.key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input.decode()}.{_b64(signature)}"

    async def _token(self, request: web.Request) -> web.Response:
        self.requests += 1
        expected = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return web.json_response({"error": "bad credentials"}, status=401)
        access = []
        for scope in request.query.getall("scope", []):
            for part in scope.split(" "):
                kind, _, rest = part.partition(":")
                name, _, actions = rest.rpartition(":")
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
        return web.json_response({"token": self.jwt(access), "expires_in": 300})
