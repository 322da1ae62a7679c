"""The examples/ directory: every consul-locker command line in it is parsed by consul-locker's own parser, the
files are parsed by the tools' own formats (YAML, systemd units, HCL via `consul validate`), their durations are
checked against each other (TimeoutStopSec above --kill-timeout, start timeouts above the lock wait and the
watchdog, a rollout deadline above an init's bounds), and the ones that can run here run against a real Consul."""

import base64
import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

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


def systemd_unescape(value):
    """A unit file's command line as the program gets it: %% is a literal %."""
    return value.replace("%%", "%")


def seconds(value):
    """A systemd time span (30s, 50min, 1h 5min) in seconds."""
    units = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "hr": 3600}
    total = 0
    for number, unit in re.findall(r"(\d+)\s*([a-z]*)", value):
        total += int(number) * units[unit or "s"]
    return total


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


def report_command():
    """The shell command line of the unit's ExecStart (it runs consul-locker under /bin/sh -c, for the hour)."""
    argv = shlex.split(report_unit().get("Service", "ExecStart"))
    assert argv[:2] == ["/bin/sh", "-c"] and argv[2].startswith("exec /usr/local/bin/consul-locker ")
    return systemd_unescape(argv[2])


def report_options():
    return locker_options(shlex.split(report_command())[2:])


def test_report_units_pass_systemd_verify(tmp_path):
    with open(REPORT_SERVICE) as f:
        service = verify_unit(tmp_path, "hourly-report.service", f.read(), {})
    with open(example("reports", "hourly-report.timer")) as f:
        timer = verify_unit(tmp_path, "hourly-report.timer", f.read(), {})
    run_verify(service, timer)


def test_report_service_makes_a_skipped_run_a_success_with_its_own_code():
    service = report_unit()
    opts = report_options()
    assert opts.no_wait
    success = [int(c) for c in service.get("Service", "SuccessExitStatus").split()]
    assert success == [opts.conflict_exit_code]
    assert opts.conflict_exit_code not in (0, 1, 2, 69, 70, 75, 76, 77, 124, 126, 127)  # "skipped", nothing else


def test_report_service_runs_once_per_hour_with_the_hour_as_once_token():
    opts = report_options()
    assert opts.once and opts.once_token == "$(date -u +%Y-%m-%dT%H)"  # expanded by /bin/sh, not by consul-locker


def test_report_service_stops_in_order_and_its_timeouts_fit_consul_lockers():
    service = report_unit()
    opts = report_options()
    assert service.get("Service", "KillMode") == "mixed"  # TERM to consul-locker only; it stops the report in order
    assert seconds(service.get("Service", "TimeoutStopSec")) > opts.kill_timeout + 5
    assert opts.max_runtime
    assert seconds(service.get("Service", "TimeoutStartSec")) > opts.max_runtime + opts.kill_timeout + 30


def test_report_timer_fires_hourly_on_every_machine_together():
    with open(example("reports", "hourly-report.timer")) as f:
        timer = unit(f.read())
    assert timer.get("Timer", "OnCalendar") == "hourly"
    assert not timer.has_option("Timer", "RandomizedDelaySec")


def cron_job():
    with open(example("reports", "crontab")) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    env = dict(ln.split("=", 1) for ln in lines if re.match(r"^[A-Z_]+=", ln))
    (job,) = [ln for ln in lines if not re.match(r"^[A-Z_]+=", ln)]
    return env, job


def test_report_cron_line_skips_with_exit_0_once_per_hour_and_logs_instead_of_mailing():
    env, job = cron_job()
    assert env["CONSUL_HTTP_ADDR"].startswith("http://")
    fields = job.split(None, 6)
    assert fields[:5] == ["0", "*", "*", "*", "*"]
    command, _, tail = fields[6].partition("2>&1")
    assert "%" not in command.replace("\\%", "")  # cron cuts the command at an unescaped %
    argv = shlex.split(command.replace("\\%", "%"))
    assert argv[0] == "consul-locker" and "logger" in tail
    opts = locker_options(argv[1:])
    assert opts.no_wait and opts.conflict_exit_code == 0
    assert opts.once_token == report_options().once_token


def run_report(consul, lock, report, env, extra=""):
    """The unit's command line, as /bin/sh runs it, with this checkout's consul-locker and the test's lock."""
    command = report_command().replace("exec /usr/local/bin/consul-locker ", f"exec {shlex.join(LOCKER)} ")
    command = command.replace(" hourly-report -- /usr/local/bin/hourly-report", f" {lock} -- {shlex.quote(report)}")
    assert lock in command and report in command
    return subprocess.Popen(["/bin/sh", "-c", command], env=locker_env(consul, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.timeout(60)
def test_two_report_runs_at_once_one_reports_the_other_skips_with_the_conflict_code(consul, name, tmp_path):
    conflict = report_options().conflict_exit_code
    release = tmp_path / "release"
    # the real report, then held open until the test has seen the other run give up
    holder = tmp_path / "report-then-hold"
    holder.write_text(f'#!/bin/sh\n"{example("reports", "hourly-report")}" || exit\n'
                      f'while [ ! -e "{release}" ]; do sleep 0.05; done\n')  # fmt: skip
    holder.chmod(0o755)
    lock = f"hourly-report-{name}"
    env = dict(unit_env(report_unit()), REPORT_DIR=str(tmp_path / "reports"))
    runs = [run_report(consul, lock, str(holder), env) for _ in range(2)]
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
    assert winner.returncode == 0, out[winner]
    (report,) = list((tmp_path / "reports").iterdir())
    assert f"lock consul-locker/{lock}/.lock, fencing index " in report.read_text()
    assert_no_session(consul, lock)


@pytest.mark.timeout(60)
def test_report_is_done_once_per_hour_even_when_a_late_machine_gets_the_lock(consul, name, tmp_path):
    """No shared directory: the hour is consul-locker's --once-token, its marker lives in Consul KV."""
    lock = f"hourly-report-{name}"
    runs = []
    for machine in ("a", "b"):
        env = dict(unit_env(report_unit()), REPORT_DIR=str(tmp_path / machine))  # each machine its own disk
        p = run_report(consul, lock, example("reports", "hourly-report"), env)
        runs.append((p.wait(30), *p.communicate()))
    (rc1, out1, err1), (rc2, out2, err2) = runs
    assert (rc1, rc2) == (0, 0), runs
    assert "wrote" in out1 and out2 == ""
    assert (tmp_path / "a").is_dir() and not (tmp_path / "b").exists()
    marker = json.loads(base64.b64decode(consul.kv(f"consul-locker/{lock}/.done")["Value"]))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d", marker["token"])
    assert_no_session(consul, lock)


# --- examples/kubernetes ------------------------------------------------------------------------------------------

WORKLOADS = ("Deployment", "Job")


def k8s_docs():
    docs = []
    for name in sorted(os.listdir(example("kubernetes"))):
        if name.endswith((".yaml", ".yml")):
            with open(example("kubernetes", name)) as f:
                docs += [(name, d) for d in yaml.safe_load_all(f) if d]
    return docs


def k8s_text(name):
    with open(example("kubernetes", name)) as f:
        return f.read()


def workload(name):
    (doc,) = [d for n, d in k8s_docs() if n == name and d["kind"] in WORKLOADS]
    return doc


def locker_containers(pod):
    return [c for c in pod.get("initContainers", []) + pod["containers"] if "consul-locker" in c.get("command", [])]


def container_options(c):
    argv = c["command"][1:] + c.get("args", [])
    assert "--" in argv, f"{c['name']}: write consul-locker OPTIONS NAME -- COMMAND"  # the podman rendering needs it
    return locker_options(argv)


def test_kubernetes_manifests_have_one_workload_each_with_consul_locker():
    docs = k8s_docs()
    assert {name for name, _ in docs} == {"migrate-initcontainer.yaml", "migrate-job.yaml", "singleton-deployment.yaml"}
    for name in {n for n, _ in docs}:
        doc = workload(name)  # exactly one Deployment or Job per file (tests/test_container.py plays each one)
        pod = doc["spec"]["template"]["spec"]
        if doc["kind"] == "Deployment":
            assert doc["apiVersion"] == "apps/v1"
            assert (
                doc["spec"]["selector"]["matchLabels"].items() <= doc["spec"]["template"]["metadata"]["labels"].items()
            )
        assert locker_containers(pod), name


def test_kubernetes_containers_reach_the_node_agent_and_leave_time_to_clean_up():
    for name, doc in k8s_docs():
        if doc["kind"] not in WORKLOADS:
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in locker_containers(pod):
            where = f"{name}: {c['name']}"
            image = c["image"]
            assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), where
            assert c["command"][0] == "consul-locker", where
            opts = container_options(c)
            assert pod["terminationGracePeriodSeconds"] > opts.kill_timeout + 5, where
            assert opts.kill_timeout + 1 < opts.lock_delay, where
            env = [e["name"] for e in c["env"]]
            assert env.index("HOST_IP") < env.index("CONSUL_HTTP_ADDR"), where  # $(HOST_IP) needs it defined first
            host_ip = next(e for e in c["env"] if e["name"] == "HOST_IP")
            assert host_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP", where
            addr = next(e for e in c["env"] if e["name"] == "CONSUL_HTTP_ADDR")
            assert addr["value"] == "http://$(HOST_IP):8500", where


def test_kubernetes_manifests_say_which_consul_they_need_and_the_alternative():
    for name in ("singleton-deployment.yaml", "migrate-initcontainer.yaml", "migrate-job.yaml"):
        assert "client agent on every node" in k8s_text(name), name
    text = k8s_text("singleton-deployment.yaml")
    assert "Dataplane" in text and "exits 69" in text
    for needed in ("consul-server.consul.svc", "CONSUL_HTTP_TOKEN_FILE", "CONSUL_CACERT", "Secret"):
        assert needed in text, needed


def test_kubernetes_migration_runs_once_per_version_within_the_rollout_deadline():
    doc = workload("migrate-initcontainer.yaml")
    (init,) = doc["spec"]["template"]["spec"]["initContainers"]
    opts = container_options(init)
    assert opts.timeout and not opts.no_wait  # every pod runs it in turn; none waits forever
    assert "migrate" in " ".join(opts.command)
    assert opts.once and opts.once_token == init["image"].rsplit(":", 1)[1]  # the version the image carries
    assert opts.max_runtime
    # the init's worst case (queue, then the watchdog's TERM and KILL) ends before the rollout is declared failed
    assert doc["spec"]["progressDeadlineSeconds"] > opts.timeout + opts.max_runtime + opts.kill_timeout + 60


def test_kubernetes_migration_job_is_a_hook_with_the_same_lock_and_a_deadline_above_its_bounds():
    job = workload("migrate-job.yaml")
    assert job["apiVersion"] == "batch/v1"
    assert "pre-upgrade" in job["metadata"]["annotations"]["helm.sh/hook"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (c,) = pod["containers"]
    opts = container_options(c)
    (init,) = workload("migrate-initcontainer.yaml")["spec"]["template"]["spec"]["initContainers"]
    assert opts.name == container_options(init).name and opts.once_token == c["image"].rsplit(":", 1)[1]
    assert job["spec"]["activeDeadlineSeconds"] > opts.timeout + opts.max_runtime + opts.kill_timeout


def test_kubernetes_singleton_has_a_standby_on_another_node_and_consul_locker_as_pid_1():
    doc = workload("singleton-deployment.yaml")
    assert doc["spec"]["replicas"] >= 2
    pod = doc["spec"]["template"]["spec"]
    (main,) = pod["containers"]
    assert main["command"] == ["consul-locker"]
    assert container_options(main).command == ["/app/bin/scheduler"]
    labels = doc["spec"]["template"]["metadata"]["labels"]
    (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"].items() <= labels.items()


def test_kubernetes_singleton_has_a_disruption_budget_that_keeps_one_pod():
    (pdb,) = [d for n, d in k8s_docs() if n == "singleton-deployment.yaml" and d["kind"] == "PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    labels = workload("singleton-deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] == 1


def test_kubernetes_singleton_promises_the_take_over_times_consul_gives():
    text = " ".join(k8s_text("singleton-deployment.yaml").split())
    opts = container_options(workload("singleton-deployment.yaml")["spec"]["template"]["spec"]["containers"][0])
    assert "TTL to 2 x TTL + lock-delay" in text and "at once" in text
    low, high = opts.ttl + opts.lock_delay, 2 * opts.ttl + opts.lock_delay
    assert f"so {low:g} to {high:g} seconds" in text


# --- examples/cloud-init ----------------------------------------------------------------------------------------


def cloud_config():
    with open(example("cloud-init", "user-data.yaml")) as f:
        text = f.read()
    assert text.splitlines()[0] == "#cloud-config"  # cloud-init ignores user data without this exact first line
    doc = yaml.safe_load(text)
    files = {f["path"]: f for f in doc["write_files"]}
    return doc, files


def boot_unit():
    _, files = cloud_config()
    return unit(files["/etc/systemd/system/boot-task.service"]["content"])


def test_cloud_init_enables_a_boot_unit_that_runs_the_task_under_the_lock():
    doc, files = cloud_config()
    service = boot_unit()
    argv = shlex.split(service.get("Service", "ExecStart"))
    assert argv[0] == "/opt/consul-locker/bin/consul-locker"
    opts = locker_options(argv[1:])
    assert opts.command == ["/usr/local/sbin/boot-task"] and opts.timeout
    assert "consul.service" in service.get("Unit", "After")
    assert files["/usr/local/sbin/boot-task"]["permissions"] == "0755"
    runcmd = [" ".join(c) if isinstance(c, list) else c for c in doc["runcmd"]]
    assert any(c.startswith("python3 -m venv /opt/consul-locker") for c in runcmd)
    assert any("enable" in c and "boot-task.service" in c for c in runcmd)


def test_cloud_init_installs_only_pinned_artifacts_never_a_public_name():
    doc, files = cloud_config()
    (pip,) = [c for c in doc["runcmd"] if "pip" in str(c[0])]
    assert "--require-hashes" in pip and "--no-index" in pip
    requirements = pip[pip.index("-r") + 1]
    lines = [ln for ln in files[requirements]["content"].splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines and any("consul_locker-" in ln for ln in lines)
    for line in lines:
        url, _, hashes = line.partition(" --hash=sha256:")
        assert url.startswith("https://") and url.endswith(".whl") and hashes, line
    named = [a for a in pip[1:] if not a.startswith("-") and a not in ("install", requirements)]
    assert named == [], named  # no package name for an index to resolve


def test_cloud_init_unit_stops_in_order_and_its_timeouts_fit_consul_lockers():
    service = boot_unit()
    opts = locker_options(shlex.split(service.get("Service", "ExecStart"))[1:])
    assert service.get("Service", "KillMode") == "mixed"
    assert seconds(service.get("Service", "TimeoutStopSec")) > opts.kill_timeout + 5
    assert opts.max_runtime
    assert seconds(service.get("Service", "TimeoutStartSec")) > opts.timeout + opts.max_runtime + opts.kill_timeout
    # Type=oneshot with Restart=on-failure: systemd refuses it before 244, and the unit says so
    assert service.get("Service", "Type") == "oneshot" and service.get("Service", "Restart") == "on-failure"
    _, files = cloud_config()
    assert "systemd 244" in files["/etc/systemd/system/boot-task.service"]["content"]


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
    service = boot_unit()
    argv = shlex.split(service.get("Service", "ExecStart"))[1:]
    argv = [name if a == "asg-boot-task" else str(script) if a == "/usr/local/sbin/boot-task" else a for a in argv]
    env = dict(unit_env(service), CONSUL_HTTP_ADDR=consul.addr)
    r = subprocess.run(LOCKER + argv, env=locker_env(consul, **env), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"lock consul-locker/{name}/.lock, fencing index " in r.stdout


# --- every example: who holds the lock, how to reset it -------------------------------------------------------

STATUS_AND_RESET = {
    # file: (the lock name, the once-marker a reset deletes, or None when there is none)
    ("kubernetes", "singleton-deployment.yaml"): ("report-scheduler", None),
    ("kubernetes", "migrate-initcontainer.yaml"): ("shop-db-migrate", "consul-locker/shop-db-migrate/.done"),
    ("kubernetes", "migrate-job.yaml"): ("shop-db-migrate", "consul-locker/shop-db-migrate/.done"),
    ("reports", "hourly-report.service"): ("hourly-report", "consul-locker/hourly-report/.done"),
    ("reports", "crontab"): ("hourly-report", "consul-locker/hourly-report/.done"),
    ("cloud-init", "user-data.yaml"): ("asg-boot-task", None),
    ("mongodb", "README.md"): ("mongodb-bootstrap", "consul-locker/mongodb-bootstrap/replica-set/rs0"),
}


@pytest.mark.parametrize("path", sorted(STATUS_AND_RESET), ids="/".join)
def test_each_example_says_who_holds_its_lock_and_how_to_reset_it(path):
    lock, marker = STATUS_AND_RESET[path]
    with open(example(*path)) as f:
        text = " ".join(f.read().split())
    assert re.search(rf"consul-locker --status (--json )?{re.escape(lock)}\b", text), path
    if marker:
        assert f"consul kv delete {marker}" in text, path
    assert re.search(r"never delete \S*\.lock", text, re.I), path  # the lock itself is never the thing to reset


# --- examples/mongodb: the Compose file and the agents' config ---------------------------------------------------


def compose():
    with open(example("mongodb", "docker-compose.yml")) as f:
        return yaml.safe_load(f)


def test_mongodb_compose_has_three_mongods_a_consul_server_and_three_locked_bootstraps():
    doc = compose()
    services = doc["services"]
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
        # bounded: the lock wait, and a watchdog above the bootstrap's own bound for its member
        ready = float(opts.command[opts.command.index("--timeout") + 1])
        assert opts.timeout and opts.max_runtime > ready + 120 + 60  # + --mongod-timeout (120) + commands


def test_mongodb_compose_runs_with_a_key_file_and_the_admin_password_from_secrets():
    doc = compose()
    secrets = doc["secrets"]
    assert set(secrets) == {"mongodb-keyfile", "mongodb-admin-password"}
    with open(example("mongodb", "mongod.conf")) as f:
        key_file = yaml.safe_load(f)["security"]["keyFile"]
    for i in (1, 2, 3):
        mongod, boot = doc["services"][f"mongo{i}"], doc["services"][f"bootstrap{i}"]
        assert mongod["secrets"] == ["mongodb-keyfile"]
        script = mongod["entrypoint"][2]
        assert mongod["entrypoint"][:2] == ["sh", "-c"]
        assert f"/run/secrets/mongodb-keyfile {key_file}" in script and "-m 0400" in script
        assert 'exec docker-entrypoint.sh "$$@"' in script  # $$: Compose would interpolate a lone $
        assert boot["secrets"] == ["mongodb-admin-password"]
        assert boot["environment"]["MONGODB_BOOTSTRAP_PASSWORD_FILE"] == "/run/secrets/mongodb-admin-password"
        assert boot["environment"]["MONGODB_BOOTSTRAP_USER"]


def test_mongodb_example_image_keeps_consul_locker_as_entrypoint():
    with open(example("mongodb", "Dockerfile")) as f:
        text = f.read()
    final_from = [ln for ln in text.splitlines() if ln.startswith("FROM ")][-1]
    assert "CONSUL_LOCKER_IMAGE" in final_from and not re.search(r"^ENTRYPOINT", text, re.M)
    assert "COPY bootstrap.py /example/bootstrap.py" in text
    assert re.search(r"^USER 10001", text, re.M)


def test_mongodb_example_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which("hadolint")
    assert hadolint, "hadolint is not installed (pip install '.[test]')"
    r = subprocess.run([hadolint, example("mongodb", "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("i", [1, 2, 3])
def test_mongodb_agent_config_is_valid_and_matches_its_member(i):
    services = compose()["services"]
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
