"""The unit `edgeproxy service install` writes, under a real systemd (PID 1 of a container).

What `systemd-analyze verify` cannot say: that the service starts with all its hardening
(User=, ProtectSystem=strict, PrivateDevices=, RestrictNamespaces=...), binds ports 80 and
443 as an unprivileged user, tells systemd it is ready (Type=notify), serves a pull through
the TLS edge, survives `systemctl reload`, fails one whose config does not check, reopens
its access log on USR1 (logrotate's way), and stops cleanly. edgeproxy is installed the way
a user would: a venv of Debian's python3, `pip install` of this checkout. The upstream is
Debian's docker-registry, a unit of the same container.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.edge import ca_dir, make_certificate
from tests.support.images import Image, build_image, random_layer
from tests.support.nspawn import boot, nspawn_missing
from tests.support.servers import write_toml

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="booting a container needs root"),
    pytest.mark.skipif(nspawn_missing() is not None, reason=str(nspawn_missing())),
]

PROJECT = Path(__file__).resolve().parents[2]
UID = 990  # the edgeproxy user of the container's /etc/passwd
REGISTRY = "127.0.0.1:5001"

CHECK_UNIT = """\
[Unit]
Description=check edgeproxy under systemd, then power off
Wants=edgeproxy.service registry.service
After=edgeproxy.service registry.service
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/bin/sh {work}/check.sh
"""

REGISTRY_UNIT = """\
[Unit]
Description=the upstream: Debian's docker-registry
Before=edgeproxy.service

[Service]
ExecStart=/usr/bin/docker-registry serve {work}/registry.yml
"""

# Facts go to out/facts as key=value lines; everything else to out/check.log.
CHECK_SCRIPT = """\
out={work}/out
exec >"$out/check.log" 2>&1
set -x
fact() {{ echo "$1=$2" >>"$out/facts"; }}
show() {{ systemctl show --value -p "$1" edgeproxy; }}
logged() {{ journalctl -u edgeproxy -q -g "$1" | wc -l; }}
# Until "$@" succeeds, a minute at most (a second or two unloaded); 1 if it never did.
wait_for() {{
    end=$(($(date +%s) + 60))
    until "$@"; do [ "$(date +%s)" -lt "$end" ] || return 1; sleep 0.1; done
}}
pull() {{ skopeo --insecure-policy copy --src-cert-dir {work}/ca \\
    docker://localhost/test/systemd:v1 "oci:/var/tmp/$1:v1" && cp "/var/tmp/$1/index.json" \\
    "$out/$1.json"; }}
wait_for curl -s -o /dev/null http://{registry}/v2/; fact registry $?
skopeo --insecure-policy copy --dest-tls-verify=false oci:{work}/image:v1 \\
    docker://{registry}/test/systemd:v1
fact pushed $?
fact state "$(show ActiveState)/$(show SubState)"
fact status "$(show StatusText)"
pid=$(show MainPID)
fact user "$(ps -o user= -p "$pid")"
fact workers "$(ps -o pid= --ppid "$pid" | wc -l)"
pull cold; fact pull_cold $?
fact redirect "$(curl -s -o /dev/null -w '%{{http_code}} %{{redirect_url}}' http://localhost/v2/)"
systemctl reload edgeproxy; fact reload $?
# systemd 252 has no Type=notify-reload: reload returns once SIGHUP is sent (as nginx's unit
# does), often before the master even read it: `active` then is the state before the reload,
# and RELOADING=1 may come any time after. The reload is done once the master logged its
# second READY=1 and the old workers exited (until then they too get USR1, and count below).
reloaded() {{
    [ "$(logged 'edgeproxy: ready: ')" -ge 2 ] && [ "$(logged 'old workers drained')" -ge 1 ] &&
        [ "$(show ActiveState)" = active ]
}}
wait_for reloaded; fact reloaded $?
fact state_after_reload "$(show ActiveState)/$(show SubState)"
fact same_main_pid "$([ "$(show MainPID)" = "$pid" ] && echo yes || echo no)"
pull warm; fact pull_warm $?
# logrotate's way: move the file, then USR1 to the main process (nginx's logrotate does so).
mv /var/log/edgeproxy/access.log /var/log/edgeproxy/access.log.1
systemctl kill --signal=USR1 --kill-whom=main edgeproxy; fact usr1 $?
workers=$(ps -o pid= --ppid "$pid" | wc -l)
reopened() {{ [ "$(logged 'accesslog: reopened')" -ge "$workers" ]; }}
wait_for reopened; fact reopened $?
curl -sk -o /dev/null https://localhost/v2/?rotated
fact state_after_usr1 "$(show ActiveState)/$(show SubState)"
cp {work}/proxy.toml {work}/proxy.good
sed -i 's/server.crt/missing.crt/' {work}/proxy.toml
systemctl reload edgeproxy; fact bad_reload $?
fact state_after_bad_reload "$(show ActiveState)/$(show SubState)"
cp {work}/proxy.good {work}/proxy.toml
systemctl stop edgeproxy; fact stop $?
fact result "$(show Result)"
fact exit_status "$(show ExecMainStatus)"
cp /var/log/edgeproxy/access.log.1 "$out/access.log.1"
cp /var/log/edgeproxy/access.log "$out/access.log"
# journald reads the units' output in its own time; --sync has it take in what is queued.
journalctl --sync
journalctl -u edgeproxy -u registry --no-pager >"$out/journal.txt"
"""


@pytest.fixture
def work() -> Iterator[Path]:
    """A folder the service can read: not under /root, /home (ProtectHome=) or /tmp
    (PrivateTmp=), and bound into the container at the same path."""
    path = Path(tempfile.mkdtemp(prefix="edgeproxy-systemd-", dir="/opt"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def install(work: Path) -> Path:
    """`python3 -m venv` (Debian's python3, as a user has it) and `pip install` of this
    checkout's package (a copy: setuptools builds in the source folder); the installed
    console script."""
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT / name, source / name)
    shutil.copytree(
        PROJECT / "edgeproxy", source / "edgeproxy", ignore=shutil.ignore_patterns("__pycache__")
    )
    venv = work / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin/pip"), "install", "-q", str(source)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr
    return venv / "bin/edgeproxy"


def configure(work: Path, edgeproxy: Path) -> Path:
    """The seed's deployment (TLS edge on 80/443, the mirror embedded) of the registry; the
    unit `edgeproxy service install` writes for it."""
    certificate, key = make_certificate(work / "certs", "localhost")
    os.chown(key, UID, UID)  # the key stays 0600, the service's own
    ca_dir(certificate, work / "ca")
    config = write_toml(
        work / "proxy.toml",
        {
            "mirror": {
                "root": "/var/lib/edgeproxy",
                "upstream": [{"name": "docker.io", "url": f"http://{REGISTRY}"}],
            },
            "edge": {
                "http": "0.0.0.0:80",
                "https": "0.0.0.0:443",
                "server_name": "localhost",
                "access_log": "/var/log/edgeproxy/access.log",
                "tls": {"certificate": str(certificate), "key": str(key)},
            },
        },
    )
    units = work / "units"
    subprocess.run(
        [str(edgeproxy), "service", "install", "--config", str(config), "--dir", str(units),
         "--user", "edgeproxy"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return units / "edgeproxy.service"


def write_container_files(work: Path) -> dict[str, Path]:
    """The check, the registry and the few /etc files an empty /etc needs."""
    etc = work / "etc"
    etc.mkdir()
    (etc / "passwd").write_text(
        f"root:x:0:0:root:/root:/bin/sh\nedgeproxy:x:{UID}:{UID}::/var/lib/edgeproxy:/bin/false\n"
    )
    (etc / "group").write_text(f"root:x:0:\nedgeproxy:x:{UID}:\n")
    (etc / "hosts").write_text("127.0.0.1 localhost\n")
    (work / "registry.yml").write_text(
        "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: /var/lib/registry\n"
        f"http:\n  addr: {REGISTRY}\n"
    )
    (work / "check.sh").write_text(CHECK_SCRIPT.format(work=work, registry=REGISTRY))
    (work / "check.service").write_text(CHECK_UNIT.format(work=work))
    (work / "registry.service").write_text(REGISTRY_UNIT.format(work=work))
    (work / "out").mkdir()
    return {
        "/etc/passwd": etc / "passwd",
        "/etc/group": etc / "group",
        "/etc/hosts": etc / "hosts",
        "/etc/systemd/system/check.service": work / "check.service",
        "/etc/systemd/system/registry.service": work / "registry.service",
    }


def pulled_digest(index: Path) -> str:
    [manifest] = json.loads(index.read_text())["manifests"]
    return str(manifest["digest"])


def test_the_installed_unit_serves_reloads_and_stops_under_systemd(work: Path) -> None:
    edgeproxy = install(work)
    image: Image = build_image(work / "image", "v1", [random_layer(2_000_003, seed=71)])
    files = write_container_files(work)
    files["/etc/systemd/system/edgeproxy.service"] = configure(work, edgeproxy)

    booted = boot("check.service", files, [work])

    out = work / "out"
    diagnosis = "\n".join(
        [booted.stdout[-3000:], booted.stderr[-2000:]]
        + [f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(out.iterdir())]
    )
    assert (out / "facts").exists(), diagnosis
    facts = dict(line.split("=", 1) for line in (out / "facts").read_text().splitlines())
    assert facts == {
        "registry": "0",  # it answered
        "pushed": "0",
        "state": "active/running",  # systemd had READY=1 (Type=notify)
        "status": "serving",
        "user": "edgeproxy",
        "workers": facts["workers"],
        "pull_cold": "0",
        "redirect": "301 https://localhost/v2/",
        "reload": "0",
        "reloaded": "0",  # the new workers serve, the old ones are gone
        "state_after_reload": "active/running",
        "same_main_pid": "yes",
        "pull_warm": "0",
        "usr1": "0",
        "reopened": "0",  # every worker said it reopened the file
        "state_after_usr1": "active/running",
        "bad_reload": "1",  # ExecReload's check failed: the signal was never sent
        "state_after_bad_reload": "active/running",
        "stop": "0",
        "result": "success",
        "exit_status": "0",
    }, diagnosis
    assert int(facts["workers"]) >= 1
    for pull in ("cold", "warm"):
        assert pulled_digest(out / f"{pull}.json") == image.manifest_digest
    rotated = (out / "access.log.1").read_text()
    for digest in image.layer_digests:  # both pulls through the edge: TLS, the seed's format
        assert rotated.count(f'"GET /v2/test/systemd/blobs/{digest} HTTP/1.1" - - 200 ') == 2
    assert " TLSv1.3 " in rotated
    # After USR1 the workers write to a new file: the request made then is there, only there.
    access = (out / "access.log").read_text()
    assert '"GET /v2/?rotated HTTP/1.1"' in access and "?rotated" not in rotated, access
    journal = (out / "journal.txt").read_text()
    assert "new workers serving" in journal, journal  # the reload: new workers, old ones drained
    assert f"edge.tls: {work}/certs/missing.crt: no such file" in journal, journal
    assert journal.count("reload: reading") == 1  # the bad one never reached the master
