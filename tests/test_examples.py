"""The examples/ directory: every consul-locker command line in it is parsed by consul-locker's own parser, the
files are parsed by the tools' own formats (YAML, systemd units, HCL via `consul validate`), and the ones that
can run here run against a real Consul."""

import configparser
import os
import re
import shlex
import shutil
import subprocess

import pytest
import yaml
from lib.consul_agent import ROOT, consul_binary, wait_until
from lib.locker import LOCKER, assert_no_session, locker_env

from shim import cli
from shim.duration import parse as parse_duration

EXAMPLES = os.path.join(ROOT, "examples")


def example(*parts):
    return os.path.join(EXAMPLES, *parts)


def locker_options(argv):
    """consul-locker's parsed options for argv (without the program name); fails on any invalid option."""
    return cli.parse_args(list(argv))


def unit(text):
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(text)
    return parser


def unit_env(parser):
    env = {}
    for item in parser.get("Service", "Environment", fallback="").splitlines():
        for pair in shlex.split(item):
            k, v = pair.split("=", 1)
            env[k] = v
    return env


def verify_unit(tmp_path, filename, text, substitutions):
    """systemd-analyze verify, with the unit's absolute paths pointed at files that exist here."""
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze is not installed")
    for old, new in substitutions.items():
        text = text.replace(old, new)
    path = tmp_path / filename
    path.write_text(text)
    return path


def run_verify(*paths):
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, paths)], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def stub_sleep(tmp_path):
    """A `sleep` that records its argument and returns at once, first on PATH."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sleep").write_text(f'#!/bin/sh\necho "$@" >>"{tmp_path}/sleeps"\n')
    (bindir / "sleep").chmod(0o755)
    return f"{bindir}:{os.environ['PATH']}"


# --- examples/10-second-wait --------------------------------------------------------------------------------------

TEN = [f"Slept {i} seconds" for i in range(1, 11)]


def test_10_second_wait_counts_ten_seconds_and_exits_with_its_argument_count(tmp_path):
    path = stub_sleep(tmp_path)
    r = subprocess.run([example("10-second-wait"), "a", "b", "c"], env=dict(os.environ, PATH=path),
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 3
    assert r.stdout.splitlines() == TEN
    assert (tmp_path / "sleeps").read_text().split() == ["1"] * 10


def test_10_second_wait_under_consul_locker(locker, consul, name, tmp_path):
    r = locker.run(name, example("10-second-wait"), "x", "y", env=locker_env(consul, PATH=stub_sleep(tmp_path)))
    assert r.returncode == 2, r.stderr
    assert r.stdout.splitlines() == TEN
    assert_no_session(consul, name)


# --- examples/reports -----------------------------------------------------------------------------------------------

REPORT_SERVICE = example("reports", "hourly-report.service")


def report_unit():
    with open(REPORT_SERVICE) as f:
        return unit(f.read())


def test_report_units_pass_systemd_verify(tmp_path):
    subs = {
        "/usr/local/bin/consul-locker": shutil.which("sh"),
        "/usr/local/bin/hourly-report": example("reports", "hourly-report"),
    }
    with open(REPORT_SERVICE) as f:
        service = verify_unit(tmp_path, "hourly-report.service", f.read(), subs)
    with open(example("reports", "hourly-report.timer")) as f:
        timer = verify_unit(tmp_path, "hourly-report.timer", f.read(), {})
    run_verify(service, timer)


def test_report_service_makes_a_skipped_run_a_success_with_its_own_code():
    service = report_unit()
    argv = shlex.split(service.get("Service", "ExecStart"))
    assert argv[0].endswith("/consul-locker")
    opts = locker_options(argv[1:])
    assert opts.no_wait
    success = [int(c) for c in service.get("Service", "SuccessExitStatus").split()]
    assert success == [opts.conflict_exit_code]
    assert opts.conflict_exit_code not in (0, 1, 2, 69, 70, 75, 76, 77, 126, 127)  # tells "skipped" from the rest


def test_report_timer_fires_hourly_on_every_machine_together():
    with open(example("reports", "hourly-report.timer")) as f:
        timer = unit(f.read())
    assert timer.get("Timer", "OnCalendar") == "hourly"
    assert not timer.has_option("Timer", "RandomizedDelaySec")


def test_report_cron_line_skips_with_exit_0_and_logs_instead_of_mailing():
    with open(example("reports", "crontab")) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    env = dict(ln.split("=", 1) for ln in lines if re.match(r"^[A-Z_]+=", ln))
    assert env["CONSUL_HTTP_ADDR"].startswith("http://")
    (job,) = [ln for ln in lines if not re.match(r"^[A-Z_]+=", ln)]
    fields = job.split(None, 6)
    assert fields[:5] == ["0", "*", "*", "*", "*"]
    command, _, tail = fields[6].partition("2>&1")
    argv = shlex.split(command)
    assert argv[0] == "consul-locker" and "logger" in tail
    opts = locker_options(argv[1:])
    assert opts.no_wait and opts.conflict_exit_code == 0


@pytest.mark.timeout(60)
def test_two_report_runs_at_once_one_reports_the_other_skips_with_the_conflict_code(consul, name, tmp_path):
    service = report_unit()
    argv = shlex.split(service.get("Service", "ExecStart"))
    conflict = locker_options(argv[1:]).conflict_exit_code
    release = tmp_path / "release"
    # the real report, then held open until the test has seen the other run give up
    holder = tmp_path / "report-then-hold"
    holder.write_text(f'#!/bin/sh\n"{example("reports", "hourly-report")}" || exit\n'
                      f'while [ ! -e "{release}" ]; do sleep 0.05; done\n')  # fmt: skip
    holder.chmod(0o755)
    lock = f"hourly-report-{name}"
    cmd = [
        *LOCKER,
        *[
            lock if a == "hourly-report" else str(holder) if a == "/usr/local/bin/hourly-report" else a
            for a in argv[1:]
        ],
    ]
    env = dict(unit_env(service), REPORT_DIR=str(tmp_path / "reports"))
    runs = [subprocess.Popen(cmd, env=locker_env(consul, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]  # fmt: skip
    try:
        loser = wait_until(lambda: next((p for p in runs if p.poll() is not None), None), 30, message="one run ends")
        release.touch()
        winner = next(p for p in runs if p is not loser)
        winner.wait(30)
        out = {p: p.communicate() for p in runs}
    finally:
        release.touch()
        for p in runs:
            if p.poll() is None:
                p.kill()
    assert loser.returncode == conflict, out[loser]
    assert "held elsewhere" in out[loser][1]
    assert winner.returncode == 0, out[winner]
    (report,) = list((tmp_path / "reports").iterdir())
    assert f"lock consul-locker/{lock}/.lock, fencing index " in report.read_text()
    assert_no_session(consul, lock)


def test_report_is_done_once_per_hour_even_when_a_late_machine_gets_the_lock(locker, consul, name, tmp_path):
    env = locker_env(consul, REPORT_DIR=str(tmp_path))
    first = locker.run(name, example("reports", "hourly-report"), env=env)
    second = locker.run(name, example("reports", "hourly-report"), env=env)
    assert (first.returncode, second.returncode) == (0, 0)
    assert "already done" in second.stdout and len(list(tmp_path.iterdir())) == 1


# --- examples/kubernetes ------------------------------------------------------------------------------------------


def k8s_docs():
    docs = []
    for name in sorted(os.listdir(example("kubernetes"))):
        if name.endswith((".yaml", ".yml")):
            with open(example("kubernetes", name)) as f:
                docs += [(name, d) for d in yaml.safe_load_all(f) if d]
    return docs


def locker_containers(pod):
    return [c for c in pod.get("initContainers", []) + pod["containers"] if "consul-locker" in c.get("command", [])]


def test_kubernetes_manifests_are_deployments_with_consul_locker():
    docs = k8s_docs()
    assert {name for name, _ in docs} == {"migrate-initcontainer.yaml", "singleton-deployment.yaml"}
    for name, doc in docs:
        assert doc["apiVersion"] == "apps/v1" and doc["kind"] == "Deployment", name
        pod = doc["spec"]["template"]["spec"]
        assert doc["spec"]["selector"]["matchLabels"].items() <= doc["spec"]["template"]["metadata"]["labels"].items()
        assert locker_containers(pod), name


def test_kubernetes_containers_reach_the_node_agent_and_leave_time_to_clean_up():
    for name, doc in k8s_docs():
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in locker_containers(pod):
            where = f"{name}: {c['name']}"
            image = c["image"]
            assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), where
            assert c["command"][0] == "consul-locker", where
            opts = locker_options(c["command"][1:] + c.get("args", []))
            assert pod["terminationGracePeriodSeconds"] > opts.kill_timeout + 5, where
            assert opts.kill_timeout + 1 < opts.lock_delay, where
            env = [e["name"] for e in c["env"]]
            assert env.index("HOST_IP") < env.index("CONSUL_HTTP_ADDR"), where  # $(HOST_IP) needs it defined first
            host_ip = next(e for e in c["env"] if e["name"] == "HOST_IP")
            assert host_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP", where
            addr = next(e for e in c["env"] if e["name"] == "CONSUL_HTTP_ADDR")
            assert addr["value"] == "http://$(HOST_IP):8500", where


def test_kubernetes_migration_runs_in_an_init_container_with_a_bounded_wait():
    (doc,) = [d for name, d in k8s_docs() if name == "migrate-initcontainer.yaml"]
    (init,) = doc["spec"]["template"]["spec"]["initContainers"]
    opts = locker_options(init["command"][1:] + init.get("args", []))
    assert opts.timeout and not opts.no_wait  # every pod runs it in turn; none waits forever
    assert "migrate" in " ".join(opts.command)


def test_kubernetes_singleton_has_a_standby_and_consul_locker_as_pid_1():
    (doc,) = [d for name, d in k8s_docs() if name == "singleton-deployment.yaml"]
    assert doc["spec"]["replicas"] >= 2
    (main,) = doc["spec"]["template"]["spec"]["containers"]
    assert main["command"] == ["consul-locker"]
    assert locker_options(main["args"]).command == ["/app/bin/scheduler"]


# --- examples/cloud-init ----------------------------------------------------------------------------------------


def cloud_config():
    with open(example("cloud-init", "user-data.yaml")) as f:
        text = f.read()
    assert text.splitlines()[0] == "#cloud-config"  # cloud-init ignores user data without this exact first line
    doc = yaml.safe_load(text)
    files = {f["path"]: f for f in doc["write_files"]}
    return doc, files


def test_cloud_init_enables_a_boot_unit_that_runs_the_task_under_the_lock():
    doc, files = cloud_config()
    service = unit(files["/etc/systemd/system/boot-task.service"]["content"])
    argv = shlex.split(service.get("Service", "ExecStart"))
    assert argv[0] == "/opt/consul-locker/bin/consul-locker"
    opts = locker_options(argv[1:])
    assert opts.command == ["/usr/local/sbin/boot-task"] and opts.timeout
    assert "consul.service" in service.get("Unit", "After")
    assert files["/usr/local/sbin/boot-task"]["permissions"] == "0755"
    runcmd = [" ".join(c) if isinstance(c, list) else c for c in doc["runcmd"]]
    assert any(c.startswith("python3 -m venv /opt/consul-locker") for c in runcmd)
    assert any("enable" in c and "boot-task.service" in c for c in runcmd)


def test_cloud_init_unit_passes_systemd_verify(tmp_path):
    _, files = cloud_config()
    script = tmp_path / "boot-task"
    script.write_text(files["/usr/local/sbin/boot-task"]["content"])
    script.chmod(0o755)
    subs = {"/opt/consul-locker/bin/consul-locker": shutil.which("sh"), "/usr/local/sbin/boot-task": str(script)}
    run_verify(
        verify_unit(tmp_path, "boot-task.service", files["/etc/systemd/system/boot-task.service"]["content"], subs)
    )


def test_cloud_init_boot_task_runs_under_the_lock(consul, name, tmp_path):
    _, files = cloud_config()
    script = tmp_path / "boot-task"
    script.write_text(files["/usr/local/sbin/boot-task"]["content"])
    script.chmod(0o755)
    service = unit(files["/etc/systemd/system/boot-task.service"]["content"])
    argv = shlex.split(service.get("Service", "ExecStart"))[1:]
    argv = [name if a == "asg-boot-task" else str(script) if a == "/usr/local/sbin/boot-task" else a for a in argv]
    env = dict(unit_env(service), CONSUL_HTTP_ADDR=consul.addr)
    r = subprocess.run(LOCKER + argv, env=locker_env(consul, **env), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"lock consul-locker/{name}/.lock, fencing index " in r.stdout


# --- examples/mongodb: the Compose file and the agents' config ---------------------------------------------------


def compose():
    with open(example("mongodb", "docker-compose.yml")) as f:
        return yaml.safe_load(f)["services"]


def test_mongodb_compose_has_three_mongods_a_consul_server_and_three_locked_bootstraps():
    services = compose()
    assert services["consul"]["image"].startswith("hashicorp/consul:") and "-server" in services["consul"]["command"]
    for i in (1, 2, 3):
        mongod, boot = services[f"mongo{i}"], services[f"bootstrap{i}"]
        assert mongod["image"].startswith("mongo:") and mongod["hostname"] == f"mongo{i}"
        conf = mongod["command"][mongod["command"].index("--config") + 1]
        assert f"./mongod.conf:{conf}:ro" in mongod["volumes"] and f"./mongod.conf:{conf}:ro" in boot["volumes"]
        assert boot["network_mode"] == f"service:mongo{i}"  # 127.0.0.1 is its mongod and its Consul agent
        assert boot["environment"]["CONSUL_HTTP_ADDR"] == "http://127.0.0.1:8500"
        # the image's ENTRYPOINT is consul-locker: the command starts with consul-locker's own arguments
        opts = locker_options(boot["command"])
        assert opts.name == "mongodb-bootstrap"
        assert opts.command[:2] == ["python", "/example/bootstrap.py"]
        assert opts.command[opts.command.index("--advertise") + 1] == f"mongo{i}:27017"
        assert opts.command[opts.command.index("--config") + 1] == conf
        assert boot["restart"] == "on-failure"
        assert parse_duration(boot["stop_grace_period"]) > opts.kill_timeout  # Docker's SIGKILL after our cleanup


def test_mongodb_example_image_keeps_consul_locker_as_entrypoint():
    with open(example("mongodb", "Dockerfile")) as f:
        text = f.read()
    final_from = [ln for ln in text.splitlines() if ln.startswith("FROM ")][-1]
    assert "CONSUL_LOCKER_IMAGE" in final_from and "ENTRYPOINT" not in text
    assert "COPY bootstrap.py /example/bootstrap.py" in text
    assert re.search(r"^USER 10001", text, re.M)


def test_mongodb_example_dockerfile_passes_hadolint():
    from test_docker import hadolint

    r = subprocess.run([hadolint(), example("mongodb", "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("i", [1, 2, 3])
def test_mongodb_agent_config_is_valid_and_matches_its_member(i):
    services = compose()
    agent = services[f"agent{i}"]
    assert agent["network_mode"] == f"service:mongo{i}"
    files = [a.split("=", 1)[1] for a in agent["entrypoint"] if a.startswith("-config-file=")]
    assert files == ["/example/consul/agent.hcl", f"/example/consul/mongo{i}.hcl"]
    assert "./consul:/example/consul:ro" in agent["volumes"]
    local = [example("mongodb", "consul", os.path.basename(p)) for p in files]
    r = subprocess.run([consul_binary(), "validate", *local], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(local[1]) as f:
        hcl = f.read()
    assert f'address = "mongo{i}"' in hcl and f'node_name = "mongo{i}"' in hcl
    assert '"/example/bootstrap.py", "check", "--config", "/etc/mongo/mongod.conf"' in hcl
