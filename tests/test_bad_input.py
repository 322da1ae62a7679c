"""Every bad input: one clear line on stderr, the documented exit code, no traceback, no session left."""

import time

import pytest
from lib.consul_agent import free_port
from lib.locker import assert_no_session, locker_env, sessions_named


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
        (["--lock-delay", "2m", "n", "true"], "0s-60s"),
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


@pytest.mark.parametrize("odd", ["with space", "slash/inside", "q?h#p%", "ünïcødé-锁", "trailing-slash/"])
def test_names_needing_url_encoding_work_and_map_to_their_key(locker, consul, odd):
    r = locker.run(odd, "sh", "-c", 'echo "$CONSUL_LOCK_KEY"')
    assert r.returncode == 0, r.stderr
    key = f"consul-locker/{odd.strip('/')}/.lock"
    assert r.stdout.strip() == key
    assert consul.kv(key) is not None  # the very key, not a mangled one
    assert_no_session(consul, odd.strip("/"))


def test_unreachable_consul_exits_69_naming_the_address(consul, name):
    from lib.locker import Runner

    port = free_port()
    env = locker_env(consul, CONSUL_HTTP_ADDR=f"127.0.0.1:{port}")
    start = time.monotonic()
    r = Runner(consul).run("--timeout", "1s", name, "true", env=env)
    assert time.monotonic() - start < 5
    assert r.returncode == 69
    line = one_line_error(r)
    assert f"127.0.0.1:{port}" in line and "unreachable" in line


def test_unreachable_consul_without_timeout_gives_up_after_a_bounded_wait(consul, name):
    from lib.locker import Runner

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
