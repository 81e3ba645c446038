#!/usr/bin/env python3
"""One-shot GPU check: everything the GPU machine has to prove, as one command of at most 8 minutes.

    python3 bench/gpu_check.py OUTDIR [--quick] [--steps env,pytest,probes,perf,peers] [--timeout STEP=S]

Each step runs as a subprocess in its own process group under its own timeout (with
PYTHONUNBUFFERED=1, XLA_PYTHON_CLIENT_PREALLOCATE=false, CUPY_CACHE_DIR=/tmp/cupy-cache); a failing or
timed-out step is recorded and the next one runs. The default timeouts add up to 480 s; ``--quick``
shrinks them and passes ``--quick`` on to the bench steps (tiny sizes, fewer runs) for a first look.

Steps, in order:
  env     versions (python, numpy, cupy, torch, jax, orbax, safetensors, ...), driver/CUDA, GPU, disk
  pytest  python3 -m pytest -m gpu -q -x tests/   (junit summary appended to the log)
  probes  python3 bench/gpu_probes.py OUTDIR/probes.json [--quick]   (skipped if the file is absent)
  perf    python3 bench/gpu_perf.py OUTDIR/perf.json [--quick]       (skipped if the file is absent)
  peers   python3 bench/gpu_peers.py OUTDIR/peers.json [--quick] --budget TIMEOUT-15

Files in OUTDIR (8 at most): check.json (env, versions and every step's rc / seconds / timed_out,
rewritten after each step so a killed run still leaves it), pytest.log, and NAME.log + NAME.json for
probes, perf and peers. Each step is also told its timeout in GPU_CHECK_TIMEOUT_S. Exit status: 0 if
every step that ran exited 0, else 1.
"""
import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("env", "pytest", "probes", "perf", "peers")
TIMEOUTS = {"env": 30, "pytest": 100, "probes": 80, "perf": 120, "peers": 150}  # 480 s in all
QUICK_TIMEOUTS = {"env": 30, "pytest": 90, "probes": 40, "perf": 40, "peers": 60}
BENCH = {"probes": "gpu_probes.py", "perf": "gpu_perf.py", "peers": "gpu_peers.py"}
DISTRIBUTIONS = ("numpy", "cupy-cuda13x", "cupy-cuda12x", "cupy", "torch", "jax", "jaxlib", "jax-cuda13-plugin",
                 "jax-cuda12-plugin", "orbax-checkpoint", "tensorstore", "safetensors", "nvidia-ml-py",
                 "cuda-bindings", "ml_dtypes", "crc32c", "psutil", "pytest", "hypothesis", "gpusaver")
MAX_FILES = 8


# --- env (runs in a child: imports of CUDA libraries can hang or crash) --------------------------
def _try(fn):
    try:
        return fn()
    except BaseException as e:  # a missing or broken library is a finding, not a failure of the step
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def _run(cmd, timeout=10):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return p.stdout.strip() if p.returncode == 0 else {"error": f"rc={p.returncode}: {p.stderr.strip()[:300]}"}


def _versions():
    import importlib.metadata as md
    out = {}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def _nvidia_smi():
    fields = "name,driver_version,memory.total,pci.bus_id,pcie.link.gen.max,pcie.link.width.max"
    rows = _run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"])
    if isinstance(rows, dict):
        return rows
    header = _run(["nvidia-smi"])
    cuda = None
    if isinstance(header, str) and "CUDA Version:" in header:
        cuda = header.split("CUDA Version:")[1].split()[0]
    gpus = [dict(zip(fields.split(","), (v.strip() for v in row.split(",")))) for row in rows.splitlines()]
    return {"gpus": gpus, "cuda_version": cuda}


def _cupy():
    import cupy
    rt = cupy.cuda.runtime
    props = rt.getDeviceProperties(0)
    name = props["name"]
    return {"version": cupy.__version__, "runtime": rt.runtimeGetVersion(), "driver": rt.driverGetVersion(),
            "device_count": rt.getDeviceCount(), "name": name.decode() if isinstance(name, bytes) else str(name),
            "compute_capability": f"{props['major']}.{props['minor']}", "total_memory": props["totalGlobalMem"]}


def _torch():
    import torch
    out = {"version": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available()}
    if out["available"]:
        major, minor = torch.cuda.get_device_capability(0)
        out.update(name=torch.cuda.get_device_name(0), capability=f"{major}.{minor}")
    return out


def _jax():
    import jax
    return {"version": jax.__version__, "devices": [str(d) for d in jax.devices()]}


def _orbax():
    import orbax.checkpoint as ocp
    return {"version": getattr(ocp, "__version__", None)}


def _gpusaver():
    import crc32c  # noqa: F401  (the dependency the GPU machine lacks unless the wheel was installed)
    import gpusaver
    return {"version": gpusaver.__version__, "file": gpusaver.__file__}


def mount_of(path) -> tuple[str, str]:
    """(mount point, file system type) holding ``path``; ("", "") where /proc/mounts is unreadable."""
    best = ("", "")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                    best = (mnt, parts[2])
    except OSError:
        pass
    return best


def _disk(path):
    mount, fstype = mount_of(path)
    st = os.statvfs(path)
    return {"path": path, "mount": mount, "fstype": fstype, "free_bytes": st.f_bavail * st.f_frsize,
            "total_bytes": st.f_blocks * st.f_frsize}


def _memory():
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return {k: int(info[k].split()[0]) * 1024 for k in ("MemTotal", "MemAvailable") if k in info}


def collect_env(outdir) -> dict:
    import platform
    return {
        "python": sys.version, "executable": sys.executable, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "memory": _try(_memory), "versions": _try(_versions),
        "nvidia_smi": _try(_nvidia_smi), "cupy": _try(_cupy), "torch": _try(_torch), "jax": _try(_jax),
        "orbax": _try(_orbax), "gpusaver": _try(_gpusaver),
        "git": _try(lambda: _run(["git", "-C", ROOT, "describe", "--always", "--dirty"])),
        "disk": {p: _try(lambda p=p: _disk(p)) for p in (ROOT, tempfile.gettempdir(), outdir)},
    }


# --- the orchestrator ---------------------------------------------------------------------------
def _junit(path) -> dict:
    """Counts and the failing tests (name, first line of the message) from pytest's junit XML."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    out = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    out["failed"] = []
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            msg = (bad.get("message") or bad.text or "").strip().splitlines()
            out["failed"].append(f"{case.get('classname')}::{case.get('name')}: {msg[0][:300] if msg else ''}")
    return out


def run_step(cmd, log_path, timeout, env) -> dict:
    """Run ``cmd`` in its own process group, stdout+stderr into ``log_path``; kill the group on timeout."""
    start = time.monotonic()
    timed_out = False
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.returncode
        if timed_out:
            log.write(f"\n[gpu_check] killed after the step's timeout of {timeout} s\n")
    return {"rc": rc, "seconds": round(time.monotonic() - start, 2), "timed_out": timed_out, "timeout_s": timeout}


def _tail(path, n=2000):
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def _summary(env: dict) -> dict:
    """The few facts a reader looks for first, flattened out of ``env``."""
    def get(*keys):
        d = env
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return d
    smi = get("nvidia_smi", "gpus")
    versions = get("versions") or {}
    return {
        "gpu": (smi[0].get("name") if smi else None) or get("cupy", "name") or get("torch", "name"),
        "driver": smi[0].get("driver_version") if smi else get("cupy", "driver"),
        "cuda": get("nvidia_smi", "cuda_version"), "cuda_runtime_cupy": get("cupy", "runtime"),
        "cuda_torch": get("torch", "cuda"), "python": (get("python") or "").split()[0] or None,
        **{k: versions.get(k) for k in ("numpy", "torch", "jax", "orbax-checkpoint", "safetensors", "crc32c")},
        "cupy": get("cupy", "version") or versions.get("cupy-cuda13x"),
        "disk_free_bytes": get("disk", ROOT, "free_bytes"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and short timeouts, for a first look")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--timeout", action="append", default=[], metavar="STEP=S", help="override a step's timeout")
    ap.add_argument("--pytest-args", default="-m gpu -q -x", help="arguments for the pytest step (before tests/)")
    ap.add_argument("--collect-env", metavar="JSON", help=argparse.SUPPRESS)  # the env step's child
    args = ap.parse_args(argv)
    outdir = os.path.abspath(args.outdir)
    if args.collect_env:  # JSON to a file: libraries print warnings on stdout/stderr while importing
        with open(args.collect_env, "w") as f:
            json.dump(collect_env(outdir), f, indent=1, default=str)
        return 0

    steps = [s for s in args.steps.split(",") if s]
    unknown = set(steps) - set(STEPS)
    if unknown:
        ap.error(f"unknown steps {sorted(unknown)}; known: {','.join(STEPS)}")
    timeouts = dict(QUICK_TIMEOUTS if args.quick else TIMEOUTS)
    for item in args.timeout:
        name, _, seconds = item.partition("=")
        if name not in timeouts:
            ap.error(f"--timeout {item}: unknown step {name!r}")
        timeouts[name] = float(seconds)
    os.makedirs(outdir, exist_ok=True)
    os.makedirs("/tmp/cupy-cache", exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false",
               CUPY_CACHE_DIR="/tmp/cupy-cache")
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if ROOT not in paths:  # gpusaver from this checkout, whether or not it is installed
        env["PYTHONPATH"] = os.pathsep.join(paths + [ROOT])
    scratch = tempfile.mkdtemp(prefix="gpu_check.")

    check = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "argv": sys.argv, "quick": args.quick, "root": ROOT, "summary": {}, "env": {}, "steps": {}}
    check_path = os.path.join(outdir, "check.json")

    def write():
        with open(check_path, "w") as f:
            json.dump(check, f, indent=1, default=str)

    t_all = time.monotonic()
    print(f"[gpu_check] {len(steps)} steps, timeouts {sum(timeouts[s] for s in steps):.0f} s in all; "
          f"output in {outdir}", flush=True)
    for name in steps:
        timeout = timeouts[name]
        step_env = dict(env, GPU_CHECK_TIMEOUT_S=str(timeout))
        note = ""
        if name == "env":
            log, result = os.path.join(scratch, "env.log"), os.path.join(scratch, "env.json")
            rec = run_step([sys.executable, os.path.abspath(__file__), outdir, "--collect-env", result], log,
                           timeout, step_env)
            rec["log_tail"] = _tail(log, 1500)
            try:
                with open(result) as f:
                    check["env"] = json.load(f)
                check["summary"] = _summary(check["env"])
                note = f"{check['summary'].get('gpu')}, driver {check['summary'].get('driver')}"
            except (OSError, ValueError) as e:
                rec["error"] = f"env output unreadable: {type(e).__name__}: {e}"
        elif name == "pytest":
            log = os.path.join(outdir, "pytest.log")
            junit = os.path.join(scratch, "junit.xml")
            cmd = [sys.executable, "-m", "pytest", *args.pytest_args.split(), "-p", "no:cacheprovider",
                   f"--junitxml={junit}", "tests/"]
            rec = run_step(cmd, log, timeout, step_env)
            if os.path.exists(junit):
                rec["junit"] = j = _junit(junit)
                note = (f"{j['tests'] - j['failures'] - j['errors'] - j['skipped']} passed, {j['failures']} failed, "
                        f"{j['errors']} errors, {j['skipped']} skipped")
                with open(log, "a") as f:
                    f.write(f"\n== junit summary: {note}\n" + "".join(f"FAILED {x}\n" for x in j["failed"]))
            else:
                note = "no junit report"
        else:
            script = os.path.join(ROOT, "bench", BENCH[name])
            result = os.path.join(outdir, f"{name}.json")
            if not os.path.exists(script):
                check["steps"][name] = {"skipped": f"bench/{BENCH[name]} not found"}
                print(f"[gpu_check] {name:7s} skipped: bench/{BENCH[name]} not found", flush=True)
                write()
                continue
            cmd = [sys.executable, script, result] + (["--quick"] if args.quick else [])
            if name == "peers":  # it sizes its runs to finish inside the step's timeout
                cmd += ["--budget", str(max(10, int(timeout) - 15))]
            rec = run_step(cmd, os.path.join(outdir, f"{name}.log"), timeout, step_env)
            try:
                with open(result) as f:
                    json.load(f)
                rec["json"] = f"{name}.json"
                note = f"-> {name}.json"
            except (OSError, ValueError) as e:
                rec["json_error"] = f"{type(e).__name__}: {e}"[:300]
                note = "no readable json"
        check["steps"][name] = rec
        write()
        print(f"[gpu_check] {name:7s} rc={rec['rc']} {rec['seconds']:6.1f}s"
              f"{' TIMED OUT' if rec['timed_out'] else ''}  {note}", flush=True)

    check["seconds"] = round(time.monotonic() - t_all, 1)
    check["disk_after"] = _try(lambda: _disk(ROOT))
    files = sorted(os.listdir(outdir))
    check["files"] = files
    if len(files) > MAX_FILES:
        check["warning"] = f"{len(files)} files in {outdir}, more than {MAX_FILES}"
        print(f"[gpu_check] warning: {check['warning']}", flush=True)
    write()
    shutil.rmtree(scratch, ignore_errors=True)
    failed = [n for n, r in check["steps"].items() if "rc" in r and r["rc"] != 0]
    print(f"[gpu_check] done in {check['seconds']} s; "
          f"{'failed: ' + ', '.join(failed) if failed else 'every step exited 0'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
