#!/usr/bin/python3
"""The Debian package (issue #18): build, install, run, purge.

Usage: debian_package_test.py SOURCE_ROOT

Root only (skipped, exit 77, otherwise; also when dpkg-buildpackage or
debhelper is missing, or when a package named arq is installed already, which
this test must not replace). Steps:
  1. copy the source tree (git's tracked and untracked-not-ignored files) to
     a temporary directory and build the packages there with
     dpkg-buildpackage (DEB_BUILD_OPTIONS=nocheck parallel=2): the source
     tree itself gets no build outputs;
  2. dpkg -i arq, libarq0, libarq-dev: the arq system user, /var/lib/arq
     (arq, 0700), /etc/arq/arqd.env with a generated SECRET_KEY (root:arq,
     0640), the conffile /etc/arq/arqd.conf;
  3. systemd-analyze verify on the installed units;
  4. (systemd is not PID 1 here) the installed arqd started directly (setpriv,
     which execs it, so that it gets the signals) as the
     arq user with the installed configuration and environment, on a free
     loopback port: /health, a publish with a token signed with the
     generated key through the installed `arq`, SIGTERM, exit 0, its files
     owned by arq;
  5. a program built against the installed libarq-dev;
  6. dpkg --purge: programs, data, environment file and user are gone.
Everything is removed at the end, whatever happened.
"""
import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request

SRC = sys.argv[1]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import failures  # noqa: E402

PKGS = ["arq", "libarq0", "libarq-dev"]


def check(cond, what):
    return harness.check(cond, what, verbose=True)


def run(*args, env=None, cwd=None, timeout=900):
    p = subprocess.run(list(args), capture_output=True, text=True, env=env, cwd=cwd,
                       timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def installed(pkg):
    rc, out, _ = run("dpkg-query", "-W", "-f=${Status}", pkg)
    return rc == 0 and "installed" in out and "not-installed" not in out


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def user_exists(name):
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def skip(why):
    print(f"skipped: {why}")
    sys.exit(77)


def main():
    if os.geteuid() != 0:
        skip("needs root (dpkg -i)")
    for tool in ("dpkg-buildpackage", "dh", "git"):
        if not shutil.which(tool):
            skip(f"{tool} not installed")
    if any(installed(p) for p in PKGS):
        skip("a package named arq/libarq is installed already")
    if user_exists("arq"):
        skip("a user named arq exists already")
    tmp = tempfile.mkdtemp(prefix="arq-deb-", dir="/var/tmp")
    os.chmod(tmp, 0o755)
    proc = None
    try:
        # 1. build from a copy
        src = os.path.join(tmp, "arq-0.1.0")
        rc, out, err = run("git", "-C", SRC, "ls-files", "-co", "--exclude-standard", "-z")
        check(rc == 0, f"git ls-files: {err}")
        for rel in [f for f in out.split("\0") if f]:
            if not os.path.isfile(os.path.join(SRC, rel)):
                continue
            os.makedirs(os.path.join(src, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(os.path.join(SRC, rel), os.path.join(src, rel))
        env = {**os.environ, "DEB_BUILD_OPTIONS": "nocheck parallel=2"}
        before = set(os.listdir(SRC))
        t0 = time.time()
        rc, out, err = run("dpkg-buildpackage", "-b", "-uc", "-us", env=env, cwd=src)
        print(f"dpkg-buildpackage: {time.time() - t0:.0f} s", flush=True)
        check(rc == 0, f"dpkg-buildpackage: {rc} {(out + err)[-2000:]}")
        check(set(os.listdir(SRC)) == before, "the source tree got no build outputs")
        debs = {p: os.path.join(tmp, f"{p}_0.1.0_amd64.deb") for p in PKGS}
        for p, path in debs.items():
            check(os.path.exists(path), f"built {os.path.basename(path)}")
        if failures:
            return

        # 2. install
        rc, out, err = run("dpkg", "-i", *debs.values(),
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        check(rc == 0, f"dpkg -i: {rc} {(out + err)[-1500:]}")
        check(all(installed(p) for p in PKGS), "the three packages are installed")
        check(user_exists("arq"), "the arq system user exists")
        u = pwd.getpwnam("arq") if user_exists("arq") else None
        check(u and u.pw_uid < 1000 and u.pw_shell.endswith("nologin"),
              f"arq is a system user without a login shell: {u}")
        st = os.stat("/var/lib/arq") if os.path.isdir("/var/lib/arq") else None
        check(st and u and st.st_uid == u.pw_uid and stat.S_IMODE(st.st_mode) == 0o700,
              "/var/lib/arq belongs to arq, mode 0700")
        env_path = "/etc/arq/arqd.env"
        st = os.stat(env_path) if os.path.exists(env_path) else None
        check(st and st.st_uid == 0 and st.st_gid == grp.getgrnam("arq").gr_gid
              and stat.S_IMODE(st.st_mode) == 0o640, f"{env_path}: root:arq 0640")
        key = None
        if st:
            m = re.search(r"^SECRET_KEY=([0-9a-f]{64})$", open(env_path).read(), re.M)
            check(m, "a generated SECRET_KEY (256 bits)")
            key = m and m.group(1)
        rc, out, _ = run("dpkg-query", "-W", "-f=${Conffiles}", "arq")
        check("/etc/arq/arqd.conf" in out, "arqd.conf is a conffile")
        for f in ("/usr/sbin/arqd", "/usr/bin/arq", "/usr/bin/arq-replay",
                  "/lib/systemd/system/arqd.service", "/lib/systemd/system/arqd.socket",
                  "/usr/share/man/man8/arqd.8.gz", "/usr/share/arq/nginx/arq.conf",
                  "/usr/share/arq/prometheus/arq-rules.yml", "/usr/include/arq/arq.h"):
            check(os.path.exists(f), f"installed: {f}")

        # 3. the units
        if shutil.which("systemd-analyze"):
            rc, out, err = run("systemd-analyze", "verify", "/lib/systemd/system/arqd.service",
                               "/lib/systemd/system/arqd.socket")
            check(rc == 0 and "arqd" not in out + err,
                  f"systemd-analyze verify: {rc} {(out + err)[-1000:]}")

        # 4. the installed arqd, as arq, with the installed configuration
        port = free_port()
        penv = {"PATH": "/usr/sbin:/usr/bin:/bin", "SECRET_KEY": key or ""}
        log = open(os.path.join(tmp, "arqd.log"), "w")
        proc = subprocess.Popen(
            ["setpriv", "--reuid=arq", "--regid=arq", "--init-groups", "--",
             "/usr/sbin/arqd", "--config", "/etc/arq/arqd.conf",
             "--port", str(port)],
            stdout=subprocess.PIPE, stderr=log, text=True, env=penv, cwd="/")
        line = proc.stdout.readline()
        check(f"127.0.0.1:{port}" in line, f"the installed arqd listens: {line!r}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            h = json.loads(r.read())
        check(h.get("status") == "healthy", f"/health: {h}")
        tok = harness.make_jwt({"sub": "pkg", "exp": int(time.time()) + 600, "pub": ["*"],
                                "subscribe": ["*"]}, key or "x")
        rc, out, err = run("/usr/bin/arq", "--url", f"ws://127.0.0.1:{port}/ws", "--token", tok,
                           "pub", "pkg.s", "installed")
        check(rc == 0 and out.strip() == "1", f"the installed arq publishes: {rc} {out!r} {err!r}")
        rc, out, err = run("/usr/bin/arq", "--url", f"ws://127.0.0.1:{port}/ws", "pub", "pkg.s",
                           "anonymous")
        check(rc == 1 and "401" in err, "no anonymous access with the package's configuration")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        check(rc == 0, f"arqd stops with SIGTERM, exit 0: {rc}")
        log.close()
        owners = {os.stat(os.path.join("/var/lib/arq", f)).st_uid
                  for f in os.listdir("/var/lib/arq")}
        check(owners == {u.pw_uid} if u else False, "its data files belong to arq")

        # 5. libarq-dev
        prog = os.path.join(tmp, "p.c")
        with open(prog, "w") as f:
            f.write('#include <arq.h>\n#include <stdio.h>\n'
                    'int main(void) { puts(arq_strerror(ARQ_ETLS)); return 0; }\n')
        rc, flags, _ = run("pkg-config", "--cflags", "--libs", "libarq")
        rc, out, err = run("cc", "-o", os.path.join(tmp, "p"), prog, *flags.split())
        check(rc == 0, f"a program builds against libarq-dev: {err}")
        rc, out, _ = run(os.path.join(tmp, "p"))
        check(rc == 0 and out.strip() == "TLS failed", f"and runs with libarq0: {out!r}")

        # 6. purge
        rc, out, err = run("dpkg", "--purge", *reversed(PKGS))
        check(rc == 0, f"dpkg --purge: {rc} {(out + err)[-1000:]}")
        check(not any(installed(p) for p in PKGS), "the packages are gone")
        for f in ("/usr/sbin/arqd", "/var/lib/arq", "/etc/arq"):
            check(not os.path.exists(f), f"purged: {f}")
        check(not user_exists("arq"), "the arq user is gone")
    finally:
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait()
        if any(installed(p) for p in PKGS):
            run("dpkg", "--purge", *reversed(PKGS))
        if user_exists("arq"):
            run("deluser", "--system", "--quiet", "arq")
        if failures and os.path.exists(os.path.join(tmp, "arqd.log")):
            print("arqd log:\n" + open(os.path.join(tmp, "arqd.log")).read()[-2000:])
        shutil.rmtree(tmp, ignore_errors=True)


main()
if failures:
    print(f"{len(failures)} check(s) failed")
    sys.exit(1)
print("all checks passed")
