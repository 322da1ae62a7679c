"""Library use: the Python context manager and the Bash consulLocker function."""

import subprocess
import threading

import pytest
from lib.locker import LOCKER, assert_no_session, locker_env

from shim import consul as consul_api
from shim.lock import NotAcquired, held


def client_for(agent):
    return consul_api.Client(consul_api.Settings(addr=agent.addr))


def test_context_manager_holds_the_key_and_gives_a_fencing_token(consul, name):
    prefix = f"consul-locker/{name}"
    with held(prefix, client=client_for(consul)) as hold:
        entry = consul.kv(f"{prefix}/.lock")
        assert entry["Session"] == hold.session
        assert hold.index == entry["ModifyIndex"]
        assert not hold.lost.is_set()
    assert not consul.kv(f"{prefix}/.lock").get("Session")
    assert_no_session(consul, name)


def test_context_manager_reports_a_lost_lock(consul, name):
    prefix = f"consul-locker/{name}"
    with held(prefix, client=client_for(consul)) as hold:
        consul.api("PUT", f"/v1/session/destroy/{hold.session}")
        assert hold.lost.wait(5)
        assert "no longer held" in hold.lost_reason or "invalidated" in hold.lost_reason


def test_context_manager_without_wait_raises_not_acquired(consul, name):
    prefix = f"consul-locker/{name}"
    inside = threading.Event()
    release = threading.Event()

    def holder():
        with held(prefix, client=client_for(consul)):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert inside.wait(10)
        with pytest.raises(NotAcquired):
            with held(prefix, wait=False, client=client_for(consul)):
                pytest.fail("the block must not run")
        with pytest.raises(NotAcquired):
            with held(prefix, timeout=0.3, client=client_for(consul)):
                pytest.fail("the block must not run")
    finally:
        release.set()
        t.join(10)
    assert_no_session(consul, name)


def bash_function(consul):
    r = subprocess.run(LOCKER + ["--bash-function"], capture_output=True, text=True, env=locker_env(consul))
    assert r.returncode == 0
    return r.stdout.replace("consul-locker ", " ".join(LOCKER) + " ")


def test_bash_function_runs_a_shell_function_under_the_lock(consul, name):
    script = f"""
{bash_function(consul)}
helper() {{ echo "helper $1"; }}
work() {{ helper "$1"; echo "held=$CONSUL_LOCK_HELD"; return 7; }}
consulLocker {name} work arg1
echo "rc=$?"
"""
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=locker_env(consul), timeout=60)
    assert r.stdout.split("\n")[:3] == ["helper arg1", "held=true", "rc=7"], r.stderr


def test_bash_function_runs_a_plain_command(consul, name):
    script = f'{bash_function(consul)}\nconsulLocker {name} sh -c "exit 5"; echo "rc=$?"'
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=locker_env(consul), timeout=60)
    assert r.stdout.strip() == "rc=5", r.stderr
