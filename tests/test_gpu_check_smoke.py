"""CPU smoke runs of the one-shot GPU check (bench/gpu_check.py) and the peers bench (bench/gpu_peers.py).

What only a GPU can show is left to the GPU machine; these prove the orchestration (steps, timeouts,
check.json) and every code path of the peers bench that runs on CPU tensors, so neither rots.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, timeout=300):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def test_check_env_step(tmp_path):
    proc = _run("gpu_check.py", tmp_path, "--quick", "--steps", "env")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[gpu_check] env" in proc.stdout
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["quick"] is True and check["files"] == ["check.json"]
    step = check["steps"]["env"]
    assert step["rc"] == 0 and step["timed_out"] is False and step["seconds"] > 0
    env = check["env"]
    assert env["python"].startswith(sys.version.split()[0])
    assert env["versions"]["numpy"] and env["gpusaver"]["version"]
    for lib in ("nvidia_smi", "cupy", "torch", "jax", "orbax"):  # present, or an error saying why not
        assert lib in env
    assert all("free_bytes" in d or "error" in d for d in env["disk"].values())
    summary = check["summary"]
    assert {"gpu", "driver", "cuda", "python", "numpy", "torch", "jax", "orbax-checkpoint", "safetensors",
            "cupy", "disk_free_bytes"} <= set(summary)
    assert summary["python"] == sys.version.split()[0] and summary["disk_free_bytes"] > 0


def test_check_step_timeout_is_recorded_and_the_run_goes_on(tmp_path):
    proc = _run("gpu_check.py", tmp_path, "--steps", "env,probes", "--timeout", "env=0.01",
                "--timeout", "probes=0.01")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["steps"]["env"]["timed_out"] is True
    assert "probes" in check["steps"]  # the next step still ran (or was skipped for a missing script)
    assert "TIMED OUT" in proc.stdout


def test_check_pytest_step_writes_junit_summary(tmp_path):
    # The real GPU selection: on a machine without a GPU every such test is skipped, none fails.
    proc = _run("gpu_check.py", tmp_path, "--steps", "pytest", "--pytest-args", "-m gpu -q")
    check = json.loads((tmp_path / "check.json").read_text())
    step = check["steps"]["pytest"]
    assert step["rc"] in (0, 5), (proc.stdout[-2000:], (tmp_path / "pytest.log").read_text()[-3000:])
    assert step["junit"]["failures"] == 0 and step["junit"]["errors"] == 0
    assert "== junit summary:" in (tmp_path / "pytest.log").read_text()


def test_peers_quick_cpu(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "peers.json"
    proc = _run("gpu_peers.py", out, "--quick", "--device", "cpu", "--workloads", "mix",
                "--scratch", tmp_path / "scratch", "--budget", 120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| contender |" in proc.stdout
    record = json.loads(out.read_text())
    assert record["device"] == "cpu" and record["definitions"] and "| contender |" in record["markdown"]
    assert not (tmp_path / "scratch").exists()
    (w,) = record["workloads"]
    assert w["workload"] == "mix" and w["num_tensors"] > 100 and w["runs_done"] >= 1
    assert w["children"]["torch"]["rc"] == 0
    summary = w["summary"]["contenders"]
    for name in ("gpusaver.save", "torch.save", "dcp.save"):
        c = summary[name]
        assert c["error"] is None and c["correct"] is True, (name, c, w["contenders"][name].get("traceback"))
        assert 0 < c["stall_s"] <= c["save_s"] and c["restore_s"] > 0
    for name, c in summary.items():  # a contender may fail (an optional library missing) but never restore wrong data
        assert c["correct"] is not False, (name, w["contenders"][name].get("mismatch"))
    reference = w["contenders"].get("gpusaver.save_async reference")
    if reference and not reference["error"]:
        run = reference["save"]["runs"][0]
        assert 0 < run["stall_s"] <= run["save_s"]
        assert run["release_s"] is not None or run["released_after_done"]
    assert {"raw file write", "raw file read"} <= set(w["summary"]["limits"])
    assert "dcp.async_save pinned" in w["errors"]  # CUDA only
