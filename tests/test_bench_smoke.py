"""Smoke runs of the benches and the demo at a tiny size, so none of them rots. No timing asserts."""
import json
import os
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CPU_CONTENDERS = {
    "gpusaver save", "gpusaver save_async", "gpusaver save_async snapshot=copy", "gpusaver save 2 shards",
    "tf.compat.v1 Saver.save", "tf.train.Checkpoint.write", "tf.train.Checkpoint.write async",
    "gpusaver save fsync=True", "tf.compat.v1 Saver.save + explicit fsync",
    "gpusaver restore", "gpusaver restore 2 shards", "tf.compat.v1 Saver.restore", "tf.train.Checkpoint.read",
    "limit: write", "limit: write + CRC32C", "limit: memcpy", "limit: write + fsync", "limit: read",
}


def _gpusaver(*args, timeout=600):
    # A fresh interpreter: the test session has already configured TensorFlow's devices.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "gpusaver.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_bench_tiny_cpu(tmp_path):
    """Run from elsewhere, without --out, by an interpreter whose sys.path was set in-process (as
    bench/cpu_bench.py does from a clone): results go to a fresh folder (never onto an earlier run's
    or the repository's bench/results), and the peak-memory children import the same gpusaver."""
    site = [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
    code = (f"import sys; sys.path[:0] = {[ROOT, *dict.fromkeys(site)]!r}; from gpusaver.cli import main; "
            "sys.exit(main(['bench', '--tiny', '--workloads', 'mix']))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    # The base interpreter: no site-packages of this venv, so no editable install to fall back on.
    python = getattr(sys, "_base_executable", sys.executable)
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out,) = [p for p in tmp_path.iterdir() if p.name.startswith("gpusaver-bench-")]
    assert not (tmp_path / "bench").exists()

    result = json.loads((out / "results.json").read_text())
    assert (out / "results.png").stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "| contender |" in md and "## Targets" in md
    assert not (out / "scratch.tmp").exists()

    (record,) = result["cpu"]
    assert record["workload"] == "mix" and record["num_tensors"] > 100
    assert CPU_CONTENDERS <= set(record["cases"])
    for name, case in record["cases"].items():
        assert len(case["runs"]) == 1 and case["runs"][0]["seconds"] > 0, name
    for name in ("gpusaver save_async", "tf.train.Checkpoint.write async"):
        assert 0 < record["cases"][name]["runs"][0]["return_s"] <= record["cases"][name]["runs"][0]["seconds"]
    assert record["restore_correct"] and all(record["restore_correct"].values())
    for name, mem in record["memory"].items():
        assert "error" not in mem, (name, mem)
        assert mem["peak_rss_bytes"] >= mem["baseline_rss_bytes"] > 0
    assert {t["target"] for t in result["targets"]} == {
        "save >= 2x tf.compat.v1 Saver.save", "restore >= 1.5x Saver.restore",
        "save_async return <= 2% of TF sync save", "copy-mode peak extra <= budget + 64 MiB",
        "save >= 90% of plain write", "restore >= 3x Saver.restore"}
    assert "Per tensor over the limit" in md and "µs/tensor over limit" in md
    assert result["machine"]["cpu_model"] and result["machine"]["versions"]["tensorflow"]
    assert "PASS" in proc.stdout or "MISS" in proc.stdout


def _python(code: str, cwd, timeout=600):
    """Run ``code`` in a fresh interpreter that imports this checkout's gpusaver."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_bench_tiny_many_and_small(tmp_path):
    """The per-tensor workloads through the TF bench: every contender runs and restores the right
    values, the per-tensor cost is reported and the workloads' own targets are judged."""
    code = ("import json, sys; from gpusaver.bench import Workload, MiB; from gpusaver.bench import report; "
            "from gpusaver.bench.cpu import bench_workload; "
            f"recs = [bench_workload(Workload(k, 4 * MiB, tiny=True), 1, 0, {str(tmp_path / 's')!r}, memory=False, "
            "progress=lambda line: None) for k in ('many', 'small')]; "
            f"result = report.assemble(recs, None, {str(tmp_path)!r}, 'test', {{}}); "
            f"report.write_all(result, {str(tmp_path)!r})")
    _python(code, tmp_path)
    result = json.loads((tmp_path / "results.json").read_text())
    many, small = result["cpu"]
    assert (many["workload"], many["num_tensors"], many["nbytes"]) == ("many", 300, 300 * 8192)
    assert small["workload"] == "small" and small["num_tensors"] == 200
    for record in (many, small):
        assert CPU_CONTENDERS <= set(record["cases"])
        assert record["restore_correct"] and all(record["restore_correct"].values())
    targets = {(t["workload"], t["target"]) for t in result["targets"]}
    assert {(many["label"], "save >= 10x Saver.save"), (many["label"], "restore >= 5x Saver.restore"),
            (many["label"], "save_async return <= 1% of TF sync save"),
            (small["label"], "save >= 80% of plain write"), (small["label"], "restore >= 3x Saver.restore")} <= targets
    md = (tmp_path / "results.md").read_text()
    assert "many 300 x 8 KiB float32 — 300 tensors" in md
    assert md.count("Per tensor over the limit") == 2


def test_bench_peers_tiny_without_tensorflow(tmp_path):
    """The TF-free mode: the core beside every peer that is installed (the others skipped with a
    reason), each load checked, the baseline child path exercised on this very checkout, and
    TensorFlow never imported."""
    code = ("import sys; from gpusaver.bench.peers import main; "
            f"status = main(['--tiny', '--workloads', 'mix,many', '--out', {str(tmp_path / 'out')!r}, "
            f"'--baseline', {ROOT!r}]); "
            "assert 'tensorflow' not in sys.modules, 'the peers bench imported TensorFlow'; sys.exit(status)")
    proc = _python(code, tmp_path)
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert not result["cpu"] and len(result["peers"]) == 2
    peers = {"safetensors", "torch.save", "torch DCP", "np.savez"}
    for record in result["peers"]:
        cases = record["cases"]
        assert {"gpusaver (core) save", "gpusaver (core) load", "limit: write", "limit: read"} <= set(cases)
        baseline = [n for n in record["load_correct"] if n.startswith("gpusaver (baseline")]
        assert len(baseline) == 1 and f"{baseline[0]} load" in cases
        for peer in peers:  # measured, or skipped with the reason printed
            assert (f"{peer} save" in cases) != (peer in record["skipped"]), peer
            if peer in record["skipped"]:
                assert f"skipping {peer}: " in proc.stdout
        assert "np.savez save" in cases  # numpy is always there
        assert record["load_correct"] and all(record["load_correct"].values())
        assert all(c["runs"][0]["seconds"] > 0 for c in cases.values())
    targets = {(t["workload"], t["target"]) for t in result["targets"]}
    many = result["peers"][1]["label"]
    assert {(many, "core save <= 10 us per tensor over plain write"), (many, "core load <= 10 us per tensor over "
            "plain read"), (many, "core save at least as fast as every peer")} <= targets
    md = (tmp_path / "out" / "results.md").read_text()
    assert "## Without TensorFlow: many 300 x 8 KiB" in md and "| plain write / read |" in md


def test_demo(tmp_path):
    directory = tmp_path / "demo"
    proc = _gpusaver("demo", str(directory))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK: restored 4 variables match" in proc.stdout
    assert (directory / "model-1.index").exists() and (directory / "checkpoint").exists()


@pytest.mark.parametrize("script, args, expect", [
    ("saver_many.py", ["--count", "300", "--runs", "1", "--top", "3"], "restore"),
    ("restore_ab.py", ["--workloads", "mix,many", "--size-gib", "0.004", "--runs", "1"], "all-or-nothing"),
    ("checkpoint_bench.py", ["--size-gib", "0.004", "--runs", "1"], "gpusaver.Checkpoint.save_async"),
    ("save_ab.py", ["--baseline", ROOT, "--workloads", "small,many", "--rounds", "1", "--runs", "1", "--tiny"],
     "Saver.save"),
    ("write_contention.py", ["--gib", "0.01", "--rounds", "1"], "beside a python load"),
])
def test_bench_scripts_run_tiny(script, args, expect):
    """The single-purpose scripts of bench/ (their figures are in the README and bench/results)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args], capture_output=True,
                          text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert expect in proc.stdout


def test_bench_rejects_unknown_workload(tmp_path):
    from gpusaver.cli import main
    with pytest.raises(SystemExit, match="unknown workload"):
        main(["bench", "--tiny", "--workloads", "huge", "--out", str(tmp_path)])


@pytest.mark.gpu
def test_bench_tiny_gpu(cupy_gpu, tmp_path):
    from gpusaver.bench import MiB, Workload
    from gpusaver.bench.gpu import bench_gpu, markdown_lines

    record = bench_gpu([Workload("mix", 4 * MiB, "float32", tiny=True)], runs=1, warmup=0,
                       scratch=str(tmp_path / "scratch"), progress=lambda line: None)
    (w,) = record["workloads"]
    assert w["load_correct"]
    assert set(w["cases"]) == {"gpusaver.save cuda", "raw pinned D2H", "gpusaver.load cuda:0", "raw pinned H2D"}
    assert all(c["runs"][0]["seconds"] > 0 for c in w["cases"].values())
    assert len(record["pack"]["cases"]) == 2
    assert any("raw pinned D2H" in line for line in markdown_lines(record))
