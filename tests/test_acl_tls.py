"""Secured Consul: an ACL agent with default deny, and TLS agents with a CA made here (openssl CLI)."""

import os
import subprocess
import time
import uuid

import pytest
from lib.consul_agent import Agent, free_port
from lib.locker import lock_key, locker_env, sessions_named

PERMISSION, UNAVAILABLE = 77, 69
MASTER = str(uuid.uuid4())
RULES = 'key_prefix "consul-locker/" { policy = "write" }\nsession_prefix "" { policy = "write" }'


def one_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# -- ACL ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def acl_agent(tmp_path_factory):
    config = {
        "primary_datacenter": "dc1",
        "acl": {"enabled": True, "default_policy": "deny", "tokens": {"master": MASTER}},
    }
    agent = Agent("acl", config=config, log_dir=str(tmp_path_factory.mktemp("acl")))
    agent.token = MASTER  # the fixture's own calls (readiness, listing sessions) use the management token
    agent.start()
    yield agent
    agent.cleanup()


def make_token(agent, rules):
    policy = agent.api("PUT", "/v1/acl/policy", {"Name": f"p-{uuid.uuid4().hex[:8]}", "Rules": rules})
    return agent.api("PUT", "/v1/acl/token", {"Policies": [{"ID": policy["ID"]}]})["SecretID"]


@pytest.fixture(scope="module")
def good_token(acl_agent):
    return make_token(acl_agent, RULES)


def test_acl_without_token_fails_in_one_line_naming_the_session_permission(acl_agent, locker, name):
    r = locker.run(name, "true", env=locker_env(acl_agent))
    assert r.returncode == PERMISSION, r.stderr
    line = one_line(r.stderr)
    assert "session" in line and "write" in line, line
    assert "no token" in line, line
    assert not sessions_named(acl_agent, name)


def test_acl_unknown_token_fails_in_one_line_saying_so(acl_agent, locker, name):
    r = locker.run(name, "true", env=locker_env(acl_agent, CONSUL_HTTP_TOKEN=str(uuid.uuid4())))
    assert r.returncode == PERMISSION, r.stderr
    assert "unknown" in one_line(r.stderr)


def test_acl_token_without_key_permission_fails_naming_the_key_and_leaves_no_session(acl_agent, locker, name):
    token = make_token(acl_agent, 'session_prefix "" { policy = "write" }')
    r = locker.run(name, "true", env=locker_env(acl_agent, CONSUL_HTTP_TOKEN=token))
    assert r.returncode == PERMISSION, r.stderr
    line = one_line(r.stderr)
    assert lock_key(name) in line and "key" in line, line
    assert token not in r.stderr
    assert not sessions_named(acl_agent, name)


def test_acl_token_with_key_read_only_fails_at_once_naming_key_write(acl_agent, locker, name):
    # Consul refuses a transaction's operation with 409 and "Permission denied", not with a 403.
    token = make_token(acl_agent, 'session_prefix "" { policy = "write" }\nkey_prefix "" { policy = "read" }')
    r = locker.run(name, "true", env=locker_env(acl_agent, CONSUL_HTTP_TOKEN=token), timeout=15)
    assert r.returncode == PERMISSION, r.stderr
    line = one_line(r.stderr)
    assert lock_key(name) in line and "write" in line, line
    assert not sessions_named(acl_agent, name)


@pytest.mark.parametrize("how", ["--token", "--token-file", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"])
def test_acl_token_with_key_and_session_write_works_and_is_never_logged(
    acl_agent, good_token, locker, name, tmp_path, how
):
    path = tmp_path / "token"
    path.write_text(good_token + "\n")
    args, extra = ["-v"], {"DEBUG": "1"}
    if how == "--token":
        args += ["--token", good_token]
    elif how == "--token-file":
        args += ["--token-file", str(path)]
    elif how == "CONSUL_HTTP_TOKEN":
        extra[how] = good_token
    else:
        extra[how] = str(path)
    r = locker.run(
        *args, name, "sh", "-c", 'test "$CONSUL_LOCK_HELD" = true && exit 3', env=locker_env(acl_agent, **extra)
    )
    assert r.returncode == 3, r.stderr
    assert "-> PUT /v1/session/create" in r.stderr  # verbose output is there, the token is not
    assert good_token not in r.stdout + r.stderr
    assert not sessions_named(acl_agent, name)


# -- TLS ---------------------------------------------------------------------------------------------------


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def make_ca(d, name):
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=d)  # fmt: skip
    return os.path.join(d, f"{name}.pem")


def make_cert(d, ca, name, san):
    """A certificate signed by `ca`, for `san` (subjectAltName text); returns (cert path, key path)."""
    with open(os.path.join(d, f"{name}.ext"), "w") as f:
        f.write(f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", cwd=d)  # fmt: skip
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)  # fmt: skip
    return os.path.join(d, f"{name}.pem"), os.path.join(d, f"{name}.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pki"))
    ca, wrong_ca = make_ca(d, "ca"), make_ca(d, "wrong-ca")
    server = make_cert(d, "ca", "server", "IP:127.0.0.1,DNS:localhost,DNS:server.dc1.consul")
    client = make_cert(d, "ca", "client", "DNS:client.dc1.consul")
    return {"dir": d, "ca": ca, "wrong_ca": wrong_ca, "server": server, "client": client}


def tls_agent(name, pki, verify_incoming):
    https = free_port()
    config = {
        "ca_file": pki["ca"],
        "cert_file": pki["server"][0],
        "key_file": pki["server"][1],
        "ports": {"https": https},
        "verify_incoming": False,
        "verify_incoming_https": verify_incoming,
    }
    agent = Agent(name, config=config, log_dir=pki["dir"]).start()
    agent.https_addr = f"https://127.0.0.1:{https}"
    return agent


@pytest.fixture(scope="module")
def tls(pki):
    agent = tls_agent("tls", pki, verify_incoming=False)
    yield agent
    agent.cleanup()


def tls_env(agent, **extra):
    return locker_env(agent, CONSUL_HTTP_ADDR=agent.https_addr, CONSUL_HTTP_SSL="true", **extra)


def test_tls_with_the_ca_of_the_agent_works(tls, pki, locker, name):
    r = locker.run("-v", name, "sh", "-c", "exit 4", env=tls_env(tls, CONSUL_CACERT=pki["ca"]))
    assert r.returncode == 4, r.stderr
    assert f"{tls.https_addr}" in r.stderr or "-> PUT /v1/session/create" in r.stderr
    assert not sessions_named(tls, name)


def test_tls_scheme_comes_from_consul_http_ssl_when_the_address_has_none(tls, pki, locker, name):
    env = tls_env(tls, CONSUL_CACERT=pki["ca"])
    env["CONSUL_HTTP_ADDR"] = tls.https_addr.replace("https://", "")
    r = locker.run(name, "sh", "-c", "exit 4", env=env)
    assert r.returncode == 4, r.stderr


def test_tls_ca_directory_works(tls, pki, locker, name, tmp_path):
    # CONSUL_CAPATH wants OpenSSL's hashed names: <subject hash>.0
    h = subprocess.run(["openssl", "x509", "-hash", "-noout", "-in", pki["ca"]], capture_output=True, text=True)
    os.symlink(pki["ca"], tmp_path / f"{h.stdout.strip()}.0")
    r = locker.run(name, "sh", "-c", "exit 4", env=tls_env(tls, CONSUL_CAPATH=str(tmp_path)))
    assert r.returncode == 4, r.stderr


def test_tls_with_the_wrong_ca_fails_at_once_in_one_line(tls, pki, locker, name):
    t0 = time.monotonic()
    r = locker.run(name, "true", env=tls_env(tls, CONSUL_CACERT=pki["wrong_ca"]))
    elapsed = time.monotonic() - t0
    assert r.returncode == UNAVAILABLE, r.stderr
    line = one_line(r.stderr)
    assert "certificate" in line.lower(), line
    assert elapsed < 5, "a certificate that does not verify is not a transient error: no retrying"
    assert not sessions_named(tls, name)


def test_tls_verify_false_works_without_a_ca(tls, locker, name):
    r = locker.run(name, "sh", "-c", "exit 4", env=tls_env(tls, CONSUL_HTTP_SSL_VERIFY="false"))
    assert r.returncode == 4, r.stderr


def test_tls_server_name_is_the_name_checked_against_the_certificate(tls, pki, locker, name):
    good = locker.run(name, "true", env=tls_env(tls, CONSUL_CACERT=pki["ca"], CONSUL_TLS_SERVER_NAME="localhost"))
    assert good.returncode == 0, good.stderr
    env = tls_env(tls, CONSUL_CACERT=pki["ca"], CONSUL_TLS_SERVER_NAME="elsewhere.example")
    bad = locker.run(name, "true", env=env)
    assert bad.returncode == UNAVAILABLE, bad.stderr
    assert "elsewhere.example" in one_line(bad.stderr) or "certificate" in bad.stderr.lower()


def test_tls_client_certificate_is_presented_when_the_agent_requires_one(pki, locker, name):
    agent = tls_agent("tls-mutual", pki, verify_incoming=True)
    try:
        env = tls_env(agent, CONSUL_CACERT=pki["ca"])
        refused = locker.run(name, "true", env=env)
        assert refused.returncode == UNAVAILABLE, refused.stderr
        one_line(refused.stderr)
        env.update(CONSUL_CLIENT_CERT=pki["client"][0], CONSUL_CLIENT_KEY=pki["client"][1])
        r = locker.run(name, "sh", "-c", "exit 4", env=env)
        assert r.returncode == 4, r.stderr
        assert not sessions_named(agent, name)
    finally:
        agent.cleanup()
