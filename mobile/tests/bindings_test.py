"""Drives the generated Python bindings of credproxy-mobile against the mock gated host.

Run by mobile/tests/bindings.rs, which builds the library, generates the bindings into
CREDPROXY_BINDINGS_DIR and starts the mock; the mock's URL, CA, username and password arrive in
MOCK_URL, MOCK_CA_PEM, MOCK_USERNAME and MOCK_PASSWORD; two more mocks gate by headers instead
(MOCK_CF_URL/MOCK_CF_CA_PEM wants a Cloudflare Access service token, MOCK_HEADER_URL/
MOCK_HEADER_CA_PEM Pangolin's token pair), and one (MOCK_MTLS_URL/MOCK_MTLS_CA_PEM) wants a client
certificate: MOCK_CLIENT_PEM, or MOCK_CLIENT_P12_HEX with the password "p12-secret". Standard
library only; everything it talks to is on loopback.
"""

import gc
import json
import os
import socket
import sys
import threading
import time
import base64
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid

sys.path.insert(0, os.environ["CREDPROXY_BINDINGS_DIR"])
import credproxy_mobile as cm  # noqa: E402

URL = os.environ["MOCK_URL"]
CA_PEM = os.environ["MOCK_CA_PEM"]
USERNAME = os.environ["MOCK_USERNAME"]
PASSWORD = os.environ["MOCK_PASSWORD"]
CF_URL, CF_CA_PEM = os.environ["MOCK_CF_URL"], os.environ["MOCK_CF_CA_PEM"]
HEADER_URL, HEADER_CA_PEM = os.environ["MOCK_HEADER_URL"], os.environ["MOCK_HEADER_CA_PEM"]
MTLS_URL, MTLS_CA_PEM = os.environ["MOCK_MTLS_URL"], os.environ["MOCK_MTLS_CA_PEM"]
CLIENT_PEM, ROTATED_PEM = os.environ["MOCK_CLIENT_PEM"], os.environ["MOCK_CLIENT_ROTATED_PEM"]
CLIENT_P12 = bytes.fromhex(os.environ["MOCK_CLIENT_P12_HEX"])
WAIT = 20  # seconds: an upper bound for events that normally arrive in milliseconds


class Provider(cm.CredentialProvider):
    """The app's side: hands over a password (and a client certificate), or raises as a buggy
    app might."""

    def __init__(self, password=None, raises=None, certificate=None):
        self.password = password
        self.raises = raises
        self.certificate = certificate
        self.calls = []

    def app_password(self, server_url, username):
        self.calls.append((server_url, username))
        if self.raises is not None:
            raise self.raises
        return self.password

    def client_certificate(self, server_url):
        return self.certificate


class Logger(cm.Logger):
    """Collects log lines; signals each access-log line (written when an exchange is done)."""

    def __init__(self):
        self.lines = []
        self.lock = threading.Lock()
        self.access = threading.Semaphore(0)

    def log(self, level, target, message):
        with self.lock:
            self.lines.append((level, target, message))
        if target == "credproxy::access":
            self.access.release()

    def wait_for_exchange(self):
        assert self.access.acquire(timeout=WAIT), "no access-log line arrived"


def config(password=PASSWORD, **overrides):
    fields = dict(
        server_url=URL,
        username=USERNAME,
        credentials=cm.Credentials.PROVIDER(provider=Provider(password)),
        listen_port=0,
        ca_pem=CA_PEM,
    )
    fields.update(overrides)
    return cm.ProxyConfig(**fields)


def get(url, headers=None):
    """GET through urllib; returns (status, parsed JSON body) for success and HTTP errors."""
    try:
        request = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def free_port():
    """A loopback port with nothing listening on it (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
    except ConnectionRefusedError:
        return True
    return False


def expect_error(kind, fn, *words):
    try:
        fn()
    except kind as err:
        text = str(err)
        for word in words:
            assert word in text, f"{word!r} not in {text!r}"
        assert PASSWORD not in text
        return err
    except Exception as err:  # noqa: BLE001 - report the wrong kind clearly
        raise AssertionError(f"expected {kind.__name__}, got {type(err).__name__}: {err}")
    raise AssertionError(f"expected {kind.__name__}, nothing was raised")


def test_proxies_counts_and_stops(logger):
    provider = Provider(PASSWORD)
    handle = cm.start_proxy(config(credentials=cm.Credentials.PROVIDER(provider=provider)))
    assert provider.calls == [(URL, USERNAME)], provider.calls
    port = handle.port()
    assert port > 0 and handle.is_running()
    assert handle.local_url() == f"http://127.0.0.1:{port}", handle.local_url()

    status, body = get(handle.local_url() + "/api/server/ping")
    assert (status, body) == (200, {"res": "pong"}), (status, body)
    logger.wait_for_exchange()
    status, body = get(handle.local_url() + "/echo/mobile?x=1")
    assert status == 200 and body["path"] == "/echo/mobile", body
    assert len(body["headers"]["authorization"]) == 1
    assert body["headers"]["authorization"][0].startswith("Basic ")
    logger.wait_for_exchange()

    stats = handle.stats()
    assert stats.requests == 2, stats
    assert stats.bytes_up == 0, stats
    assert stats.bytes_down > len('{"res":"pong"}'), stats
    assert stats.last_error is None, stats

    handle.stop()
    assert not handle.is_running()
    assert refused(port), "the port still accepts after stop()"
    handle.stop()  # a second stop does nothing
    assert handle.stats().requests == 2


def test_drop_stops(logger):
    handle = cm.start_proxy(config())
    port = handle.port()
    assert not refused(port)
    del handle
    gc.collect()
    assert refused(port), "the port still accepts after the handle was dropped"


def test_last_error_for_unreachable_server_and_rejection(logger):
    handle = cm.start_proxy(config(server_url=f"https://127.0.0.1:{free_port()}"))
    status, body = get(handle.local_url() + "/api/server/ping")
    assert status == 502 and body["error"] == "upstream_unreachable", (status, body)
    logger.wait_for_exchange()
    stats = handle.stats()
    assert stats.requests == 1 and "cannot connect" in (stats.last_error or ""), stats
    handle.stop()

    handle = cm.start_proxy(config(password="not-the-password"))
    status, body = get(handle.local_url() + "/api/server/ping")
    assert status == 502 and body["error"] == "credentials_rejected", (status, body)
    logger.wait_for_exchange()
    assert "rejected" in (handle.stats().last_error or ""), handle.stats()
    handle.stop()


def test_errors_are_exceptions(logger):
    expect_error(cm.MobileError.InvalidConfig, lambda: cm.start_proxy(config(server_url="http://localhost:1")), "https")
    expect_error(cm.MobileError.InvalidConfig, lambda: cm.start_proxy(config(username="a:b")), "username")
    expect_error(cm.MobileError.InvalidConfig, lambda: cm.start_proxy(config(ca_pem="not a pem")), "ca_pem")
    expect_error(cm.MobileError.Credentials, lambda: cm.start_proxy(config(password=None)), USERNAME)
    expect_error(cm.MobileError.Credentials, lambda: cm.start_proxy(config(password="")), USERNAME)
    app_error = cm.MobileError.Credentials(detail="keystore is locked")
    raising = config(credentials=cm.Credentials.PROVIDER(provider=Provider(raises=app_error)))
    expect_error(cm.MobileError.Credentials, lambda: cm.start_proxy(raising), "keystore is locked")
    buggy = config(credentials=cm.Credentials.PROVIDER(provider=Provider(raises=ValueError("bug"))))
    expect_error(cm.MobileError.Failed, lambda: cm.start_proxy(buggy), "callback")
    profile = "mobile-test-" + uuid.uuid4().hex[:12]
    expect_error(
        cm.MobileError.Credentials,
        lambda: cm.start_proxy(config(credentials=cm.Credentials.KEYRING(profile=profile))),
        "keyring",
    )
    expect_error(cm.MobileError.InvalidConfig, lambda: cm.save_app_password("../x", "pw"), "profile")
    expect_error(cm.MobileError.InvalidConfig, lambda: cm.start_proxy(config(pin="sha256/AAAA")), "pin")
    expect_error(cm.MobileError.InvalidConfig, lambda: cm.start_proxy(config(pin="md5/x")), "pin")
    expect_error(
        cm.MobileError.InvalidConfig,
        lambda: cm.start_proxy(config(local_auth=True, local_token="short")),
        "local_token",
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        expect_error(cm.MobileError.Listen, lambda: cm.start_proxy(config(listen_port=port)), str(port))


WRONG_PIN = "sha256/" + base64.b64encode(bytes(32)).decode()


def test_pin_trusts_a_self_signed_server(logger):
    tls = cm.check(config())[2]
    pin = tls.detail.split("pin ")[-1].split(";")[0].strip()
    assert pin.startswith("sha256/"), tls
    handle = cm.start_proxy(config(ca_pem=None, pin=pin))
    status, body = get(handle.local_url() + "/api/server/ping")
    assert (status, body) == (200, {"res": "pong"}), (status, body)
    logger.wait_for_exchange()
    handle.stop()

    handle = cm.start_proxy(config(pin=WRONG_PIN))
    status, body = get(handle.local_url() + "/api/server/ping")
    assert status == 502 and body["error"] == "upstream_tls", (status, body)
    logger.wait_for_exchange()
    assert "TLS" in (handle.stats().last_error or ""), handle.stats()
    handle.stop()


def basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_local_credential(logger):
    handle = cm.start_proxy(config(local_auth=True))
    url = urllib.parse.urlsplit(handle.local_url())
    assert url.username == "credproxy" and len(url.password) >= 16, handle.local_url()
    assert url.port == handle.port()
    plain = f"http://127.0.0.1:{handle.port()}/api/server/ping"
    status, body = get(plain)
    assert status == 401 and body["error"] == "local_credential_required", (status, body)
    logger.wait_for_exchange()
    status, body = get(plain, {"Authorization": basic("credproxy", "wrong-token-0000000")})
    assert status == 401, (status, body)
    logger.wait_for_exchange()
    status, body = get(plain, {"Authorization": basic(url.username, url.password)})
    assert (status, body) == (200, {"res": "pong"}), (status, body)
    logger.wait_for_exchange()
    assert handle.stats().requests == 3, handle.stats()
    handle.stop()

    chosen = "app-chosen-token-" + uuid.uuid4().hex
    handle = cm.start_proxy(config(local_auth=True, local_token=chosen))
    assert handle.local_url() == f"http://credproxy:{chosen}@127.0.0.1:{handle.port()}", handle.local_url()
    status, _ = get(f"http://127.0.0.1:{handle.port()}/api/server/ping", {"Authorization": basic("credproxy", chosen)})
    assert status == 200
    logger.wait_for_exchange()
    handle.stop()


def test_keyring_profile(logger):
    """The platform keyring store by profile (Secret Service here; skipped without one)."""
    profile = "mobile-test-" + uuid.uuid4().hex[:12]
    try:
        cm.save_app_password(profile, PASSWORD)
    except cm.MobileError.Credentials as err:
        if "not reachable" in str(err):
            print(f"skip {test_keyring_profile.__name__}: {err}")
            return
        raise
    try:
        keyring = cm.Credentials.KEYRING(profile=profile)
        handle = cm.start_proxy(config(credentials=keyring, local_auth=True))
        first_url = handle.local_url()
        token = urllib.parse.urlsplit(first_url).password
        status, body = get(
            f"http://127.0.0.1:{handle.port()}/api/server/ping",
            {"Authorization": basic("credproxy", token)},
        )
        assert (status, body) == (200, {"res": "pong"}), (status, body)
        logger.wait_for_exchange()
        handle.stop()
        # The local credential is kept: clients' URLs survive a restart.
        handle = cm.start_proxy(config(credentials=keyring, local_auth=True))
        assert urllib.parse.urlsplit(handle.local_url()).password == token
        handle.stop()
        results = cm.check(config(credentials=cm.Credentials.KEYRING(profile=profile)))
        assert all(r.status == cm.CheckStatus.PASS for r in results), results
    finally:
        assert cm.delete_app_password(profile)
    assert not cm.delete_app_password(profile)
    expect_error(cm.MobileError.Credentials, lambda: cm.start_proxy(config(credentials=keyring)), profile)


def test_checks_are_records(logger):
    names = ["dns", "tcp", "tls", "gate", "credentials", "immich", "websocket"]
    passed, failed = cm.CheckStatus.PASS, cm.CheckStatus.FAIL
    results = cm.check(config())
    assert [r.name for r in results] == names, results
    assert all(r.status == passed for r in results), results
    assert "pin sha256/" in results[2].detail, results[2]

    results = cm.check(config(password="not-the-password"))
    assert [r.status for r in results] == [passed] * 4 + [failed] * 3, results
    assert USERNAME in results[4].detail and "app password" in (results[4].fix or ""), results[4]
    assert all("not-the-password" not in r.detail for r in results), results
    assert results[5].detail.startswith("not checked"), results[5]

    results = cm.check(config(server_url=f"https://127.0.0.1:{free_port()}"))
    assert [r.status for r in results] == [passed] + [failed] * 6, results
    assert "cannot connect" in results[1].detail, results[1]

    results = cm.check(config(ca_pem=None))
    assert [r.status for r in results][:3] == [passed, passed, failed], results


def test_a_provider_that_changes_its_answer_heals_the_proxy(logger):
    provider = Provider("an-expired-app-password")
    handle = cm.start_proxy(config(credentials=cm.Credentials.PROVIDER(provider=provider)))
    base = f"http://127.0.0.1:{handle.port()}"
    status, body = get(f"{base}/api/server/ping")
    assert status == 502 and body["error"] == "credentials_rejected", body
    assert handle.stats().credentials_state == "rejected", handle.stats()
    # The user saves a fresh app password in the app; nothing restarts the proxy.
    provider.password = PASSWORD
    deadline = time.monotonic() + WAIT
    while get(f"{base}/api/server/ping")[0] != 200:
        assert time.monotonic() < deadline, "the proxy never asked the provider again"
        time.sleep(0.05)
    stats = handle.stats()
    assert stats.credentials_state == "accepted" and stats.last_accepted, stats
    assert len(provider.calls) >= 2, provider.calls
    assert handle.reload_credentials() is False
    provider.password = "saved-again"
    assert handle.reload_credentials() is True
    handle.stop()


def test_every_scheme_serves_and_checks(logger):
    schemes = [
        (CF_URL, CF_CA_PEM, cm.AuthScheme.CLOUDFLARE_ACCESS(), "team.access\ncf-secret-9"),
        (
            HEADER_URL,
            HEADER_CA_PEM,
            cm.AuthScheme.HEADER(names=["P-Access-Token-Id", "P-Access-Token"]),
            "tid-1\ntok-2",
        ),
    ]
    for url, ca_pem, auth, secret in schemes:
        fields = dict(server_url=url, ca_pem=ca_pem, username="", auth=auth)
        handle = cm.start_proxy(config(password=secret, **fields))
        status, body = get(f"http://127.0.0.1:{handle.port()}/api/server/ping")
        assert status == 200 and body == {"res": "pong"}, (auth, status, body)
        handle.stop()
        results = cm.check(config(password=secret, **fields))
        assert all(r.status == cm.CheckStatus.PASS for r in results), (auth, results)
        results = cm.check(config(password="wrong\nvalues", **fields))
        by_name = {r.name: r for r in results}
        assert by_name["credentials"].status == cm.CheckStatus.FAIL, (auth, results)


def test_client_certificates(logger):
    pem = cm.ClientCertificate.PEM(pem=CLIENT_PEM)
    provider = Provider(PASSWORD, certificate=pem)
    mtls = dict(server_url=MTLS_URL, ca_pem=MTLS_CA_PEM)
    handle = cm.start_proxy(config(credentials=cm.Credentials.PROVIDER(provider=provider), **mtls))
    base = f"http://127.0.0.1:{handle.port()}"
    status, body = get(f"{base}/api/server/ping")
    assert status == 200 and body == {"res": "pong"}, (status, body)
    # A new certificate from the app reaches the running proxy.
    provider.certificate = cm.ClientCertificate.PEM(pem=ROTATED_PEM)
    assert handle.reload_credentials() is True
    assert get(f"{base}/api/server/ping")[0] == 200
    handle.stop()
    results = cm.check(config(credentials=cm.Credentials.PROVIDER(provider=Provider(PASSWORD, certificate=pem)), **mtls))
    assert results[0].name == "client cert" and "CN=phone" in results[0].detail, results[0]
    assert all(r.status == cm.CheckStatus.PASS for r in results), results

    handle = cm.start_proxy(config(**mtls))
    status, body = get(f"http://127.0.0.1:{handle.port()}/api/server/ping")
    assert status == 502 and body["error"] == "client_certificate_rejected", body
    assert "asks for a client certificate and none was sent" in body["message"], body
    handle.stop()

    profile = f"py-mtls-{uuid.uuid4().hex[:8]}"
    expect_error(
        cm.MobileError.InvalidConfig,
        lambda: cm.save_client_certificate(profile, cm.ClientCertificate.PKCS12(data=CLIENT_P12, password="nope")),
        "PKCS#12 password is wrong",
    )
    try:
        cm.save_client_certificate(profile, cm.ClientCertificate.PKCS12(data=CLIENT_P12, password="p12-secret"))
        cm.save_app_password(profile, PASSWORD)
        keyring = cm.Credentials.KEYRING(profile=profile)
        handle = cm.start_proxy(config(credentials=keyring, **mtls))
        status, _ = get(f"http://127.0.0.1:{handle.port()}/api/server/ping")
        assert status == 200, status
        handle.stop()
    finally:
        assert cm.delete_app_password(profile) is True


def main():
    logger = Logger()
    cm.set_logger(logger, cm.LogLevel.INFO)
    tests = [
        test_proxies_counts_and_stops,
        test_drop_stops,
        test_last_error_for_unreachable_server_and_rejection,
        test_errors_are_exceptions,
        test_pin_trusts_a_self_signed_server,
        test_local_credential,
        test_keyring_profile,
        test_checks_are_records,
        test_a_provider_that_changes_its_answer_heals_the_proxy,
        test_every_scheme_serves_and_checks,
        test_client_certificates,
    ]
    failed = 0
    for test in tests:
        try:
            test(logger)
            print(f"ok   {test.__name__}")
        except Exception:  # noqa: BLE001 - every failure is reported, then counted
            failed += 1
            print(f"FAIL {test.__name__}")
            traceback.print_exc()
    cm.set_logger(None, cm.LogLevel.INFO)
    with logger.lock:
        leaked = [line for line in logger.lines if PASSWORD in line[2]]
        assert not leaked, leaked
        assert any(t == "credproxy::access" for _, t, _ in logger.lines)
    print(f"python bindings: {len(tests) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
