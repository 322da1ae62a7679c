"""The core contract: exit codes, child environment, fencing index, --no-wait, --timeout, no session left."""

import signal
import subprocess
import time

import pytest
from lib.consul_agent import wait_until
from lib.locker import assert_no_session, lock_key

LOCK_FLAG = 0x2DDCCBC058A50C18  # the Flags value of `consul lock` keys


def hold_key(consul, key, lock_delay="0s"):
    """Take `key` with a session of our own (another holder), as `consul lock` would. Returns the session."""
    sid = consul.api("PUT", "/v1/session/create", {"Name": "other holder", "TTL": "60s", "LockDelay": lock_delay})["ID"]
    assert consul.api("PUT", f"/v1/kv/{key}?acquire={sid}&flags={LOCK_FLAG}", b"other") is True
    return sid


@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_child_exit_code_is_passed_through(locker, consul, name, code):
    r = locker.run(name, "sh", "-c", f"exit {code}")
    assert r.returncode == code, r.stderr
    assert_no_session(consul, name)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGUSR1])
def test_child_killed_by_signal_gives_128_plus_n(locker, consul, name, sig):
    r = locker.run(name, "sh", "-c", f"kill -{int(sig)} $$")
    assert r.returncode == 128 + sig, r.stderr
    assert_no_session(consul, name)


def test_command_not_found_exits_127_without_session(locker, consul, name):
    r = locker.run(name, "no-such-command-xyz")
    assert r.returncode == 127
    assert "no-such-command-xyz" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not sessions_for(consul, name)


def test_command_not_executable_exits_126(locker, consul, name, tmp_path):
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    r = locker.run(name, str(script))
    assert r.returncode == 126, r.stderr
    assert "permission denied" in r.stderr.lower()


def test_directory_as_command_exits_126(locker, name, tmp_path):
    r = locker.run(name, str(tmp_path))
    assert r.returncode == 126


def sessions_for(consul, name):
    return [s for s in consul.sessions() if name in s.get("Name", "")]


def test_child_environment_names_the_hold(locker, consul, name):
    script = 'echo "$CONSUL_LOCK_HELD|$CONSUL_LOCK_KEY|$CONSUL_LOCK_SESSION|$CONSUL_LOCK_INDEX"'
    r = locker.run(name, "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    held, key, session, index = r.stdout.strip().split("|")
    assert held == "true"
    assert key == lock_key(name)
    assert len(session) == 36
    assert int(index) > 0


def test_key_is_held_by_the_childs_session_while_it_runs(locker, consul, name, tmp_path):
    marker = tmp_path / "session"
    p = locker.popen(
        name, "sh", "-c", f'echo "$CONSUL_LOCK_SESSION" > {marker}.tmp; mv {marker}.tmp {marker}; sleep 30'
    )
    try:
        wait_until(marker.exists, 15, message="child started")
        entry = consul.kv(lock_key(name))
        assert entry["Session"] == marker.read_text().strip()
        assert entry["Flags"] == LOCK_FLAG
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=20)
    assert p.returncode == 128 + signal.SIGTERM
    assert not consul.kv(lock_key(name)).get("Session")  # released with ?release=, not deleted
    assert_no_session(consul, name)


def test_fencing_index_strictly_increases_over_successive_holds(locker, consul, consul_bin, name):
    seen = []
    for i in range(4):
        r = locker.run(name, "sh", "-c", 'echo "$CONSUL_LOCK_INDEX"')
        assert r.returncode == 0, r.stderr
        seen.append(int(r.stdout))
        if i == 1:
            # `consul lock` deletes the key after its own hold, so LockIndex restarts; ModifyIndex must not.
            subprocess.run(
                [consul_bin, "lock", f"-http-addr={consul.addr}", f"consul-locker/{name}", "true"],
                check=True,
                capture_output=True,
                timeout=30,
            )
            assert consul.kv(lock_key(name)) is None
    assert seen == sorted(seen) and len(set(seen)) == len(seen), seen


def test_no_wait_leaves_the_holders_key_untouched(locker, consul, name, tmp_path):
    key = lock_key(name)
    sid = hold_key(consul, key)
    before = consul.kv(key)
    ran = tmp_path / "ran"
    r = locker.run("--no-wait", name, "touch", str(ran))
    assert r.returncode == 1
    assert not ran.exists()
    after = consul.kv(key)
    assert after["Session"] == sid and after["ModifyIndex"] == before["ModifyIndex"]
    assert_no_session(consul, name)
    consul.api("PUT", f"/v1/session/destroy/{sid}")


def test_conflict_exit_code_is_configurable(locker, consul, name):
    sid = hold_key(consul, lock_key(name))
    r = locker.run("--no-wait", "--conflict-exit-code", "0", name, "false")
    assert r.returncode == 0
    r = locker.run("--no-wait", "--conflict-exit-code", "9", name, "true")
    assert r.returncode == 9
    consul.api("PUT", f"/v1/session/destroy/{sid}")


def test_timeout_zero_means_one_attempt(locker, consul, name):
    assert locker.run("--timeout", "0", name, "true").returncode == 0
    sid = hold_key(consul, lock_key(name))
    assert locker.run("--timeout", "0s", name, "true").returncode == 1
    consul.api("PUT", f"/v1/session/destroy/{sid}")


def test_timeout_gives_up_at_the_deadline_not_later(locker, consul, name):
    sid = hold_key(consul, lock_key(name))
    start = time.monotonic()
    r = locker.run("--timeout", "1500ms", name, "true")
    elapsed = time.monotonic() - start
    assert r.returncode == 1, r.stderr
    # Interpreter start-up is on top of the 1.5 s; `consul lock` can overshoot by its 5 s retry sleep.
    assert 1.5 <= elapsed < 3.0, elapsed
    assert_no_session(consul, name)
    consul.api("PUT", f"/v1/session/destroy/{sid}")


def test_waiter_runs_as_soon_as_the_holder_releases(locker, consul, name, tmp_path):
    sid = hold_key(consul, lock_key(name))
    ran = tmp_path / "ran"
    log = tmp_path / "stderr"
    with open(log, "w") as err:
        p = locker.popen("-v", name, "touch", str(ran), stderr=err)
    # The waiter has seen the key held and blocks on it: its -v log shows a blocking query (?index=) on the key.
    wait_until(lambda: "index=" in log.read_text(), 15, message="the waiter's blocking query")
    assert not ran.exists()
    consul.api("PUT", f"/v1/kv/{lock_key(name)}?release={sid}&flags={LOCK_FLAG}")
    assert p.wait(15) == 0
    assert ran.exists()
    consul.api("PUT", f"/v1/session/destroy/{sid}")


def test_lock_delay_refusal_is_retried_soon_after_the_delay(locker, consul, name):
    """`consul lock` sleeps a fixed 5 s after a lock-delay refusal; we retry when the delay can have passed."""
    sid = hold_key(consul, lock_key(name), lock_delay="1s")
    consul.api("PUT", f"/v1/session/destroy/{sid}")  # invalidation: lock-delay of 1 s starts now
    start = time.monotonic()
    r = locker.run("--timeout", "20s", name, "true")
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - start < 4.0


def test_stdin_is_inherited_by_the_child(locker, name):
    r = locker.run(name, "cat", input="hello through stdin\n")
    assert r.returncode == 0
    assert r.stdout == "hello through stdin\n"


def test_shell_option_runs_command_through_sh(locker, name):
    r = locker.run("--shell", name, "echo a && echo b; exit 3")
    assert r.returncode == 3
    assert r.stdout.split() == ["a", "b"]


def test_arguments_after_name_reach_the_child_untouched(locker, name):
    r = locker.run(name, "--", "printf", "%s|", "--no-wait", "-v", "a b", "*")
    assert r.returncode == 0
    assert r.stdout == "--no-wait|-v|a b|*|"


def test_stop_signal_while_waiting_exits_128_plus_n_without_running(locker, consul, name, tmp_path):
    sid = hold_key(consul, lock_key(name))
    ran = tmp_path / "ran"
    p = locker.popen(name, "touch", str(ran))
    wait_until(lambda: sessions_for(consul, name), 15, message="waiter's session")
    start = time.monotonic()
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=10)
    assert time.monotonic() - start < 1.0
    assert p.returncode == 128 + signal.SIGINT
    assert not ran.exists()
    assert_no_session(consul, name)
    consul.api("PUT", f"/v1/session/destroy/{sid}")


def test_debug_output_never_shows_the_token(locker, consul, name):
    from lib.locker import locker_env

    secret = "5a1e8d2c-0000-4000-8000-7e57c0ffee00"
    r = locker.run(name, "true", env=locker_env(consul, DEBUG="1", CONSUL_HTTP_TOKEN=secret))
    assert r.returncode == 0, r.stderr
    assert "/v1/session/create" in r.stderr  # DEBUG does log requests
    assert secret not in r.stderr and secret not in r.stdout
    r = locker.run("-v", "--token", secret, name, "true")
    assert "/v1/txn" in r.stderr and secret not in r.stderr


def test_version_and_help_exit_zero(locker):
    assert locker.run("--version").stdout.startswith("consul-locker ")
    r = locker.run("--help")
    assert r.returncode == 0 and "--kill-timeout" in r.stdout and "exit codes" in r.stdout


def test_warns_when_kill_timeout_is_not_below_lock_delay(locker, name):
    r = locker.run("--lock-delay", "5s", "--kill-timeout", "10s", name, "true")
    assert r.returncode == 0
    assert "warning" in r.stderr and "--lock-delay" in r.stderr


def test_no_session_left_after_each_kind_of_exit(locker, consul, name):
    assert locker.run(name, "true").returncode == 0
    assert locker.run(name, "false").returncode == 1
    assert locker.run(name, "no-such-command-xyz").returncode == 127
    sid = hold_key(consul, lock_key(name))
    assert locker.run("--no-wait", name, "true").returncode == 1
    assert locker.run("--timeout", "200ms", name, "true").returncode == 1
    consul.api("PUT", f"/v1/session/destroy/{sid}")
    assert_no_session(consul, name)
