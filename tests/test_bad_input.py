"""Every bad input: one clear line on stderr, the documented exit code, no traceback, no session left.

Issue 9, items 4 and 7 (../shared/contract.md, "Additions (second round)", "Names and input"): bad names, absurd
durations and tokens are exit 2 before anything is sent to Consul (a fault proxy in front of the agent counts the
connections it gets), and an answer Consul would never give a good request (a redirect) is exit 69, never "free".
How these failed on the code before the fixes (SHIM_SRC=/work/snap-old): NAME `/lead`, `lead/` and `/` were
accepted (the key got a double or stripped slash); `--timeout 3000000h` exit 70 (OverflowError); 8761h accepted;
a token file that is not UTF-8 exit 70; a token with CR/LF or non-ASCII, or such a CONSUL_HTTP_AUTH, was sent
(or crashed); a 301 read as "free" ran the command; `--timeout 1ms` gave up (exit 1) without an attempt.
"""

import time
import urllib.error
import urllib.parse

import pytest
from lib.consul_agent import free_port, wait_until
from lib.faultproxy import FaultProxy
from lib.locker import Runner, assert_no_session, locker_env, sessions_named


def one_line_error(r):
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert "Traceback" not in r.stderr
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("consul-locker: ")
    return lines[0]


@pytest.mark.parametrize(
    "args, fragment",
    [
        ([], "required"),
        (["just-a-name"], "COMMAND is missing"),
        (["just-a-name", "--"], "COMMAND is missing"),
        (["--no-such-option", "n", "true"], "--no-such-option"),
        (["--timeout", "soon", "n", "true"], "invalid duration"),
        (["--kill-timeout", "5x", "n", "true"], "invalid duration"),
        (["--ttl", "5s", "n", "true"], "10s-24h"),
        (["--ttl", "25h", "n", "true"], "10s-24h"),
        (["--lock-delay", "2m", "n", "true"], "0s-"),
        (["--limit", "0", "n", "true"], "invalid limit"),
        (["--conflict-exit-code", "256", "n", "true"], "exit code"),
        (["a//b", "true"], "segment"),
        (["..", "true"], "segment"),
        (["bad\nname", "true"], "printable"),
        (["--prefix", "", "n", "true"], "non-empty"),
    ],
)
def test_usage_error_is_one_line_and_exit_2(locker, consul, args, fragment):
    r = locker.run(*args)
    assert r.returncode == 2
    assert fragment in one_line_error(r)


@pytest.mark.parametrize("odd", ["with space", "slash/inside", "q?h#p%", "ünïcødé-锁", "dots..in.a.name"])
def test_names_needing_url_encoding_work_and_map_to_their_key(locker, consul, odd):
    r = locker.run(odd, "sh", "-c", 'echo "$CONSUL_LOCK_KEY"')
    assert r.returncode == 0, r.stderr
    key = f"consul-locker/{odd}/.lock"
    assert r.stdout.strip() == key
    assert consul.kv(key) is not None  # the very key, not a mangled one
    assert_no_session(consul, odd)


def test_unreachable_consul_exits_69_naming_the_address(consul, name):
    port = free_port()
    env = locker_env(consul, CONSUL_HTTP_ADDR=f"127.0.0.1:{port}")
    start = time.monotonic()
    r = Runner(consul).run("--timeout", "1s", name, "true", env=env)
    assert time.monotonic() - start < 5
    assert r.returncode == 69
    line = one_line_error(r)
    assert f"127.0.0.1:{port}" in line and "unreachable" in line


@pytest.mark.slow
def test_unreachable_consul_without_timeout_gives_up_after_a_bounded_wait(consul, name):
    env = locker_env(consul, CONSUL_HTTP_ADDR=f"http://127.0.0.1:{free_port()}")
    r = Runner(consul).run(name, "true", env=env, timeout=40)
    assert r.returncode == 69
    one_line_error(r)


def test_unsupported_address_is_a_usage_error(locker, consul, name):
    r = locker.run(name, "true", env=locker_env(consul, CONSUL_HTTP_ADDR="ftp://x:1"))
    assert r.returncode == 2
    assert "address" in one_line_error(r)


def test_missing_token_file_is_a_usage_error(locker, consul, name, tmp_path):
    r = locker.run("--token-file", str(tmp_path / "nope"), name, "true")
    assert r.returncode == 2
    assert "token file" in one_line_error(r)
    assert not sessions_named(consul, name)


# -- refused before anything is sent ------------------------------------------------------------------------------
@pytest.fixture
def proxy(consul):
    """A proxy in front of the agent: `accepted` counts the connections consul-locker opened, `log` its requests."""
    fp = FaultProxy(("127.0.0.1", consul.http_port), http=True).start()
    yield fp
    fp.close()


def refused(locker, consul, proxy, *args, **env):
    """Run consul-locker ARGS through the proxy: exit 2, one line, and not one connection to Consul."""
    r = locker.run(*args, env=locker_env(consul, CONSUL_HTTP_ADDR=proxy.addr, **env), timeout=30)
    assert r.returncode == 2, r.stderr
    line = one_line_error(r)
    assert proxy.accepted == 0, f"{proxy.accepted} connection(s) to Consul: {proxy.log}"
    return line


BAD_KEY_PARTS = [
    "/lead",  # issue 9: the key became consul-locker//lead, which Consul's router answers with a redirect
    "lead/",
    "/",
    "a//b",
    ".",
    "..",
    "./a",
    "a/.",
    "a/./b",
    "a/../b",
    "bad\nname",
    "tab\there",
    "del\x7fete",
    "esc\x1b[0m",
    "cr\r",
]


@pytest.mark.parametrize("bad", BAD_KEY_PARTS, ids=repr)
def test_a_bad_name_is_refused_before_anything_is_sent(locker, consul, proxy, tmp_path, bad):
    marker = tmp_path / "ran"
    refused(locker, consul, proxy, bad, "touch", marker)
    assert not marker.exists()


@pytest.mark.parametrize("bad", BAD_KEY_PARTS, ids=repr)
def test_a_bad_prefix_is_refused_before_anything_is_sent(locker, consul, proxy, name, tmp_path, bad):
    marker = tmp_path / "ran"
    refused(locker, consul, proxy, "--prefix", bad, name, "touch", marker)
    assert not marker.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--timeout", "3000000h"],
        ["--kill-timeout", "3000000h"],
        ["--timeout", "99999999999999999999999999h"],
        ["--timeout", "8761h"],
        ["--timeout", "8760h1s"],
        ["--kill-timeout", "8761h"],
        ["--max-runtime", "8761h"],
        ["--ttl", "9s"],
        ["--ttl", "86401s"],
        ["--lock-delay", "61s"],
        ["--lock-delay", "60001ms"],
    ],
    ids=" ".join,
)
def test_an_absurd_duration_is_a_usage_error(locker, consul, proxy, name, tmp_path, args):
    marker = tmp_path / "ran"
    refused(locker, consul, proxy, *args, name, "touch", marker)
    assert not marker.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--timeout", "8760h"],
        ["--kill-timeout", "8760h"],
        ["--max-runtime", "8760h"],
        ["--ttl", "10s"],
        ["--ttl", "24h"],
        ["--lock-delay", "0s"],
        ["--lock-delay", "60s"],
    ],
    ids=" ".join,
)
def test_durations_at_the_bounds_are_accepted(locker, consul, name, tmp_path, args):
    marker = tmp_path / "ran"
    r = locker.run(*args, name, "touch", marker)
    assert r.returncode == 0, r.stderr
    assert marker.exists()
    assert "Traceback" not in r.stderr
    assert_no_session(consul, name)


@pytest.mark.parametrize(
    "token",
    [b"\xff\xfe not utf-8", b"two\nlines", b"carriage\rreturn", "tökén".encode()],
    ids=["not-utf8", "LF", "CR", "non-ascii"],
)
def test_a_bad_token_file_is_refused_before_anything_is_sent(locker, consul, proxy, name, tmp_path, token):
    path = tmp_path / "token"
    path.write_bytes(token)
    assert "token" in refused(locker, consul, proxy, "--token-file", path, name, "true").lower()


@pytest.mark.parametrize(
    "where, value",
    [
        ("--token", "abc\r\nX-Injected: 1"),
        ("--token", "tökén"),
        ("CONSUL_HTTP_TOKEN", "line\nbreak"),
        ("CONSUL_HTTP_TOKEN", "токен"),
        ("CONSUL_HTTP_AUTH", "user:pässword"),
        ("CONSUL_HTTP_AUTH", "user:pass\r\nX-Injected: 1"),
    ],
    ids=["flag-CRLF", "flag-non-ascii", "env-LF", "env-non-ascii", "auth-non-ascii", "auth-CRLF"],
)
def test_a_token_or_header_value_with_crlf_or_non_ascii_is_refused(locker, consul, proxy, name, where, value):
    if where.startswith("--"):
        refused(locker, consul, proxy, where, value, name, "true")
    else:
        refused(locker, consul, proxy, name, "true", **{where: value})


def test_a_token_file_with_a_trailing_newline_is_fine(locker, consul, name, tmp_path):
    path = tmp_path / "token"
    path.write_text("3f1c8c55-0b7e-4f7c-9a57-6d7e4c3b2a10\n")  # as `echo TOKEN > file` writes it
    r = locker.run("--token-file", path, name, "true")
    assert r.returncode == 0, r.stderr


# -- --timeout shorter than a round trip still makes one attempt ----------------------------------------------------
def test_a_timeout_of_1ms_on_a_free_lock_still_runs_the_command(locker, consul, name, tmp_path):
    marker = tmp_path / "ran"
    r = locker.run("--timeout", "1ms", name, "touch", marker)
    assert r.returncode == 0, r.stderr
    assert marker.exists()
    assert_no_session(consul, name)


def test_a_timeout_shorter_than_a_slow_round_trip_still_makes_one_attempt(locker, consul, proxy, name, tmp_path):
    for method in ("GET", "PUT"):
        proxy.rule("delay", method, "/v1/", seconds=0.1)  # every request takes longer than the timeout
    marker = tmp_path / "ran"
    r = locker.run("--timeout", "1ms", name, "touch", marker, env=locker_env(consul, CONSUL_HTTP_ADDR=proxy.addr))
    assert r.returncode == 0, r.stderr
    assert marker.exists()
    assert_no_session(consul, name)


# -- answers Consul gives no good request -------------------------------------------------------------------------
@pytest.mark.parametrize("limit", [1, 2])
def test_a_redirect_from_consul_is_exit_69_never_free(locker, consul, proxy, name, tmp_path, limit):
    # What Consul's router answers for a path with an empty or dot segment. Followed, the redirect would lead to a
    # free key elsewhere: the answer must be an error, not a lock.
    moved = {"Location": "/v1/kv/consul-locker/elsewhere/.lock"}
    proxy.rule("respond", "GET", "/v1/kv/", status=301, headers=moved, content="<a href>Moved Permanently</a>")
    marker = tmp_path / "ran"
    env = locker_env(consul, CONSUL_HTTP_ADDR=proxy.addr)
    start = time.monotonic()
    r = locker.run("--limit", limit, name, "touch", marker, env=env, timeout=30)
    elapsed = time.monotonic() - start
    reads = proxy.requests("GET", "/v1/kv/")
    print(f"\n--limit {limit}: exit {r.returncode} after {elapsed:.2f} s, {len(proxy.log)} requests")
    assert r.returncode == 69, r.stderr
    assert "301" in one_line_error(r)
    assert not marker.exists(), "a redirect was read as a free lock"
    assert len(reads) <= 3, f"{len(reads)} reads: a redirect is not worth retrying"
    assert not [x for x in reads if "elsewhere" in x.path], "the redirect was followed"
    assert_no_session(consul, name)
    try:
        keys = consul.api("GET", f"/v1/kv/consul-locker/{urllib.parse.quote(name)}/?keys")
    except urllib.error.HTTPError as e:  # 404: no key at all under the prefix
        assert e.code == 404
        keys = []
    assert not keys, f"keys left: {keys}"


@pytest.mark.slow
def test_server_errors_while_waiting_are_retried_with_backoff(locker, consul, proxy, name, tmp_path):
    failing = proxy.rule("respond", "GET", "/v1/kv/", status=500, content="rpc error: No cluster leader")
    marker = tmp_path / "ran"
    p = locker.popen(name, "touch", marker, env=locker_env(consul, CONSUL_HTTP_ADDR=proxy.addr))
    try:
        failing.wait_hit(15)
        first = failing.hits[0].t
        wait_until(lambda: time.monotonic() >= first + 3 or p.poll() is not None, 10)
        in_window = [h for h in failing.hits if h.t <= first + 3]
        proxy.remove(failing)  # the leader is back
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    print(f"\n{len(in_window)} reads in 3 s of answers 500")
    assert p.returncode == 0, err
    assert marker.exists()
    assert 2 <= len(in_window) <= 20, f"{len(in_window)} reads in 3 s: no backoff"
    assert_no_session(consul, name)
