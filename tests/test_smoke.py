from helpers import assert_no_session


def test_child_exit_code_is_passed_through(locker, consul, name):
    r = locker.run(name, "sh", "-c", "exit 42")
    assert r.returncode == 42, r.stderr
    assert_no_session(consul, name)
