#!/usr/bin/python3
"""`meson install` into a DESTDIR (issue #18): the programs, libarq (shared
and static), arq.h and a libarq.pc that works, the man pages, the units, the
examples; and `promtool` on the shipped alert rules.

Usage: install_test.py MESON BUILD_DIR CC PROMTOOL

Installs the build into a temporary DESTDIR (--no-rebuild: the build is
current when meson runs its tests), then builds a small client program with
nothing but the installed .pc (PKG_CONFIG_SYSROOT_DIR), links it both ways
and runs it, and checks that the shared library exports arq.h's functions
only. promtool checks deploy/prometheus/arq-rules.yml and runs its unit
test (the installed copies).
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile

MESON, BUILD, CC, PROMTOOL = sys.argv[1:5]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import failures  # noqa: E402


def check(cond, what):
    return harness.check(cond, what, verbose=True)


def run(*args, env=None, cwd=None):
    p = subprocess.run(list(args), capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    return p.returncode, p.stdout, p.stderr


PROGRAM = r"""
#include <arq.h>
#include <event2/event.h>
#include <stdio.h>
#include <string.h>

/* Links against the installed libarq and exercises it without a server:
 * a client for a URL nobody listens on fails its connection cleanly. */
static void on_connect(arq_client_t *c, int status, void *arg)
{
    *(int *)arg = status;
    (void)c;
}

int main(void)
{
    struct event_base *base = event_base_new();
    arq_client_options_t o = {.url = "ws://127.0.0.1:1/ws", .connect_timeout_ms = 5000};
    arq_client_t *c;
    if (arq_client_new(base, &o, &c) != 0)
        return 3;
    arq_client_options_t bad = {.url = "http://x"};
    arq_client_t *c2;
    if (arq_client_new(base, &bad, &c2) != ARQ_EINVAL)
        return 4;
    int status = 1;
    if (arq_client_connect(c, on_connect, &status) != 0)
        return 5;
    event_base_dispatch(base);
    printf("%s|%s\n", arq_strerror(status), arq_strerror(ARQ_ETLS));
    arq_client_free(c);
    event_base_free(base);
    return status == ARQ_ECONNECT ? 0 : 6;
}
"""


def main():
    tmp = tempfile.mkdtemp(prefix="arq-install-", dir="/var/tmp")
    dest = os.path.join(tmp, "dest")
    try:
        rc, out, err = run(MESON, "install", "-C", BUILD, "--destdir", dest, "--no-rebuild",
                           "--quiet")
        check(rc == 0, f"meson install: {rc} {err[-800:]}")
        rc, out, _ = run(MESON, "introspect", BUILD, "--buildoptions")
        import json
        opts = {o["name"]: o["value"] for o in json.loads(out)}
        prefix = dest + opts["prefix"]
        libdir = os.path.join(prefix, opts["libdir"])
        want = [os.path.join(prefix, opts["sbindir"], "arqd"),
                os.path.join(prefix, opts["bindir"], "arq"),
                os.path.join(prefix, opts["bindir"], "arq-replay"),
                os.path.join(prefix, opts["includedir"], "arq", "arq.h"),
                os.path.join(libdir, "libarq.a"),
                os.path.join(libdir, "libarq.so.0"),
                os.path.join(libdir, "pkgconfig", "libarq.pc"),
                os.path.join(prefix, opts["mandir"], "man8", "arqd.8"),
                os.path.join(prefix, opts["mandir"], "man1", "arq.1"),
                os.path.join(prefix, opts["mandir"], "man1", "arq-replay.1"),
                os.path.join(prefix, opts["datadir"], "arq", "examples", "arqd.conf"),
                os.path.join(prefix, opts["datadir"], "arq", "nginx", "arq.conf"),
                os.path.join(prefix, opts["datadir"], "arq", "prometheus", "arq-rules.yml"),
                os.path.join(prefix, opts["datadir"], "doc", "arq", "operations.md")]
        units = glob.glob(os.path.join(dest + (opts.get("systemdunitdir") or opts["prefix"] + "/lib/systemd/system"), "arqd.*"))
        for w in want:
            check(os.path.exists(w), f"installed: {w[len(dest):]}")
        check(sorted(os.path.basename(u) for u in units) == ["arqd.service", "arqd.socket"],
              f"the systemd units are installed: {units}")
        svc = [u for u in units if u.endswith(".service")]
        if svc:
            text = open(svc[0]).read()
            exe = os.path.join(opts["prefix"], opts["sbindir"], "arqd")
            check(f"ExecStart={exe} " in text and "Type=notify" in text and "WatchdogSec=" in text,
                  "arqd.service runs the installed arqd as Type=notify with a watchdog")
        for prog, sect in (("arqd", "8"), ("arq", "1"), ("arq-replay", "1")):
            page = os.path.join(prefix, opts["mandir"], "man" + sect, f"{prog}.{sect}")
            if os.path.exists(page):
                rc, out, _ = run("man", "-l", "-P", "cat", page,
                                 env={**os.environ, "MANWIDTH": "80"})
                check(rc == 0 and "SYNOPSIS" in out and prog in out, f"man {prog}({sect}) renders")
        # the installed binaries run
        rc, out, _ = run(want[0], "--version")
        check(rc == 0 and out.startswith("arqd "), f"installed arqd --version: {out!r}")
        rc, out, _ = run(want[1], "--version")
        check(rc == 0 and out.startswith("arq "), f"installed arq --version: {out!r}")

        # a program built against the installed .pc, nothing else
        src = os.path.join(tmp, "prog.c")
        with open(src, "w") as f:
            f.write(PROGRAM)
        env = {**os.environ, "PKG_CONFIG_PATH": os.path.join(libdir, "pkgconfig"),
               "PKG_CONFIG_SYSROOT_DIR": dest}
        rc, cflags, err = run("pkg-config", "--cflags", "libarq", env=env)
        check(rc == 0 and dest in cflags, f"pkg-config --cflags libarq: {cflags!r} {err!r}")
        rc, libs, err = run("pkg-config", "--libs", "libarq", env=env)
        check(rc == 0 and "-larq" in libs, f"pkg-config --libs libarq: {libs!r}")
        rc, out, err = run(CC, "-o", os.path.join(tmp, "prog"), src, *cflags.split(),
                           *libs.split(), "-levent_core")
        check(rc == 0, f"a program builds against the installed libarq.pc: {err[-800:]}")
        rc, out, err = run(os.path.join(tmp, "prog"),
                           env={**os.environ, "LD_LIBRARY_PATH": libdir})
        check(rc == 0 and out.strip() == "connection failed|TLS failed",
              f"and runs against libarq.so: {rc} {out!r} {err!r}")
        rc, slibs, err = run("pkg-config", "--static", "--libs", "libarq", env=env)
        static_libs = [x if x != "-larq" else os.path.join(libdir, "libarq.a")
                       for x in slibs.split()]
        rc, out, err = run(CC, "-o", os.path.join(tmp, "prog-static"), src, *cflags.split(),
                           *static_libs, "-levent_core")
        check(rc == 0, f"and links the static libarq.a with pkg-config --static: {err[-800:]}")
        rc, out, err = run(os.path.join(tmp, "prog-static"))
        check(rc == 0, f"the static build runs: {rc} {err!r}")
        rc, out, _ = run("nm", "-D", "--defined-only", os.path.join(libdir, "libarq.so.0"))
        syms = [ln.split()[-1].split("@")[0] for ln in out.splitlines() if " T " in ln]
        header = open(want[3]).read()
        check(syms and all(s.startswith("arq_") and f"{s}(" in header for s in syms),
              f"libarq.so exports arq.h's functions only: {[s for s in syms if f'{s}(' not in header]}")
        check("arq_client_on_token" in syms and "arq_set_error" not in syms,
              "the token provider is exported, internals are not")

        # the alert rules
        rules_dir = os.path.join(prefix, opts["datadir"], "arq", "prometheus")
        rc, out, err = run(PROMTOOL, "check", "rules", os.path.join(rules_dir, "arq-rules.yml"))
        check(rc == 0 and "SUCCESS" in out, f"promtool check rules: {out}{err}")
        rc, out, err = run(PROMTOOL, "test", "rules", "arq-rules.test.yml", cwd=rules_dir)
        check(rc == 0 and "SUCCESS" in out, f"promtool test rules: {out}{err}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"{len(failures)} check(s) failed")
        sys.exit(1)
    print("all checks passed")


main()
