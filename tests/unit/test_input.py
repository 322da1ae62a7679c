"""Input rules without Consul: names, durations, bounds, the command line, exit-code mapping."""

import os
import signal

import pytest

from shim import cli
from shim.duration import format_go, format_human, parse
from shim.errors import UsageError
from shim.lock import Hold, Options, check_key_part
from shim.supervisor import exit_code, marker_matches


@pytest.mark.parametrize("text, seconds", [("500ms", 0.5), ("15s", 15), ("1m30s", 90), ("2h", 7200), ("3", 3)])
def test_durations_in_go_style(text, seconds):
    assert parse(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "1x", "-1s", "1s2", "10 s"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError):
        parse(text)


def test_durations_are_written_back_for_consul_and_for_people():
    assert format_go(15) == "15s" and format_go(0.25) == "250ms"
    assert format_human(86400) == "24h" and format_human(60) == "60s" and format_human(5400) == "90m"


@pytest.mark.parametrize("name", ["/lead", "lead/", "a//b", "a/./b", "..", "a/..", "bad\nname", "tab\there", ""])
def test_names_that_would_make_a_bad_key_are_usage_errors(name):
    with pytest.raises(UsageError):
        check_key_part("NAME", name)


@pytest.mark.parametrize("name", ["lead", "team/job", "ünïcødé-锁", "a.b", "with space"])
def test_ordinary_names_pass(name):
    check_key_part("NAME", name)


@pytest.mark.parametrize(
    "kw", [{"ttl": 5}, {"ttl": 86401}, {"lock_delay": 61}, {"lock_delay": -1}, {"limit": 0}, {"prefix": "a//b"}]
)
def test_lock_options_validate_themselves(kw):
    with pytest.raises(UsageError):
        Options(**{"prefix": "consul-locker/x", **kw})


def test_session_names_are_unique_and_say_host_and_pid():
    a, b = Options("p"), Options("p")
    assert a.session_name != b.session_name
    assert f"pid {os.getpid()}" in a.session_name and a.session_name.startswith("consul-locker p on ")


@pytest.mark.parametrize(
    "argv",
    [
        ["--timeout", "3000000h", "n", "true"],
        ["--kill-timeout", "8761h", "n", "true"],
        ["--max-runtime", "9000h", "n", "true"],
        ["--ttl", "9s", "n", "true"],
        ["--lock-delay", "61s", "n", "true"],
        ["--once", "--limit", "2", "n", "true"],
        ["--status", "n", "true"],
        ["--json", "n", "true"],
        ["-e", "256", "n", "true"],
        ["n"],
        ["/n", "true"],
        ["--prefix", "a/", "n", "true"],
    ],
)
def test_bad_command_lines_are_usage_errors(argv):
    with pytest.raises(UsageError):
        cli.parse_args(argv)


def test_command_line_defaults_and_implications():
    a = cli.parse_args(["--once-token", "v2", "-e", "3", "-e", "143", "job", "--", "run", "--flag"])
    assert a.once and a.once_token == "v2" and a.success_exit_code == [3, 143]
    assert a.prefix == "consul-locker/job" and a.command == ["run", "--flag"]
    assert cli.parse_args(["--timeout", "0", "n", "true"]).no_wait


def test_wait_statuses_map_as_a_shell_reports_them():
    assert exit_code(3 << 8) == 3
    assert exit_code(signal.SIGTERM) == 128 + signal.SIGTERM


def test_a_once_marker_counts_for_a_plain_once_and_for_the_same_token():
    assert marker_matches({"token": None}, None)
    assert marker_matches({"token": "v1"}, "v1")
    assert not marker_matches({"token": "v1"}, "v2")
    assert not marker_matches({"token": None}, "v1")
    assert marker_matches({"token": "v1"}, None)  # a plain --once: the marker exists, so it is done
    assert not marker_matches(None, None)


def test_the_child_is_told_the_key_session_and_fencing_token():
    env = Hold(key="p/.lock", session="s", index=42).env()
    assert env == {"CONSUL_LOCK_HELD": "true", "CONSUL_LOCK_KEY": "p/.lock", "CONSUL_LOCK_SESSION": "s",
                   "CONSUL_LOCK_INDEX": "42"}  # fmt: skip
