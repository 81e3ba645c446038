"""The ``gpusaver`` command line: ls/inspect, verify, diff, latest, --version, bench and demo; the
library's logger; the project files users look for (LICENSE, URLs, CHANGELOG)."""
import json
import logging
import os
import pty
import subprocess
import sys
import tomllib
import tracemalloc

import numpy as np
import pytest

import gpusaver
from gpusaver.cli import main
from gpusaver.format import naming
from gpusaver.format.state import CheckpointState, write_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env.update(extra)
    return env


def _cli(*args, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpusaver", *args], capture_output=True, text=True,
                          cwd=cwd, env=env or _env(), timeout=timeout)


@pytest.fixture
def ckpt(tmp_path):
    """A small checkpoint in a directory whose state file names it, as a Saver leaves it."""
    arrays = {"dense/kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
              "dense/bias": np.array([1, 2, 3], dtype=np.int64),
              "words": np.array([b"a", b"bc"], dtype=object)}
    prefix = gpusaver.save(str(tmp_path / "model-7"), arrays)
    write_state(str(tmp_path), CheckpointState("model-7", ["model-7"]))
    return prefix


def _corrupt_byte(prefix: str, name: str):
    from gpusaver.format import BundleReader
    with BundleReader(prefix) as r:
        entry = r.entry(name)
        path = r.data_file(entry)
    with open(path, "r+b") as f:
        f.seek(entry.offset)
        b = f.read(1)
        f.seek(entry.offset)
        f.write(bytes([b[0] ^ 0xFF]))
    return path


# --- --version, python -m gpusaver --------------------------------------------------------------
def test_python_m_gpusaver_version():
    proc = _cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"gpusaver {gpusaver.__version__}"


# --- ls / inspect -------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["prefix", "directory", "index", "data", "state_file"])
def test_ls_lists_tensors_and_totals_from_any_path(ckpt, tmp_path, capsys, how):
    path = {"prefix": ckpt, "directory": str(tmp_path), "index": ckpt + ".index",
            "data": naming.data_path(ckpt, 0, 1), "state_file": str(tmp_path / "checkpoint")}[how]
    assert main(["ls", path]) == 0
    out = capsys.readouterr().out
    assert ckpt in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("dense", "words"))}
    assert lines["dense/kernel"][1:4] == ["float32", "[2,3]", "24"]
    assert lines["dense/bias"][1:4] == ["int64", "[3]", "24"]
    assert lines["words"][1:3] == ["string", "[2]"]
    assert "3 tensors" in out


def test_inspect_json(ckpt, capsys):
    assert main(["inspect", ckpt, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in info["tensors"]}
    assert rows["dense/kernel"] == {"name": "dense/kernel", "dtype": "float32", "shape": [2, 3], "bytes": 24,
                                    "shard": 0}
    assert info["total_tensors"] == 3 and info["total_bytes"] == sum(r["bytes"] for r in info["tensors"])
    assert info["prefix"] == ckpt and info["object_graph"] is False


def test_ls_shows_object_graph_names(tf, tmp_path, capsys):
    class Model(tf.Module):
        def __init__(self):
            self.kernel = tf.Variable(tf.ones([2, 2]), name="dense/kernel")

    prefix = tf.train.Checkpoint(model=Model()).write(str(tmp_path / "obj"))
    assert main(["ls", prefix, "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["tensors"]}
    assert rows["model/kernel/.ATTRIBUTES/VARIABLE_VALUE"]["object"] == "dense/kernel"
    assert main(["ls", prefix]) == 0
    assert "object" in capsys.readouterr().out.splitlines()[1]


def test_ls_tensor_prints_values_as_tf_inspect_checkpoint(tf, ckpt, capsys):
    from tensorflow.python.tools import inspect_checkpoint
    for name in ("dense/kernel", "words"):
        inspect_checkpoint.print_tensors_in_checkpoint_file(ckpt, name, all_tensors=False)
        expected = capsys.readouterr().out
        assert main(["ls", ckpt, "--tensor", name]) == 0
        assert capsys.readouterr().out == expected
    assert main(["ls", ckpt, "--tensor", "dense/kernel", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["values"] == [[0, 1, 2], [3, 4, 5]]


def test_ls_unknown_tensor_and_missing_checkpoint_say_what_exists(ckpt, tmp_path, capsys):
    assert main(["ls", ckpt, "--tensor", "kernel"]) == 2
    assert "dense/kernel" in capsys.readouterr().err  # the near miss is offered
    assert main(["ls", str(tmp_path / "model-8")]) == 2
    err = capsys.readouterr().err
    assert "model-8.index" in err and ckpt in err


# --- verify -------------------------------------------------------------------------------------
def test_verify_sound_checkpoint(ckpt, capsys):
    assert main(["verify", ckpt]) == 0
    assert capsys.readouterr().out.startswith("OK: 3 tensors")


def test_verify_names_each_bad_tensor_and_file(ckpt, capsys):
    data = _corrupt_byte(ckpt, "dense/kernel")
    _corrupt_byte(ckpt, "words")
    assert main(["verify", ckpt]) == 1
    out = capsys.readouterr().out
    bad = [line for line in out.splitlines() if line.startswith("BAD ")]
    assert len(bad) == 2, out
    assert any(line.startswith("BAD dense/kernel: ") and data in line for line in bad)
    assert any(line.startswith("BAD words: ") and data in line for line in bad)
    assert "dense/bias" not in out
    assert main(["verify", ckpt, "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert sorted(b["name"] for b in result["bad"]) == ["dense/kernel", "words"]
    assert all(b["file"] == data for b in result["bad"])


def test_verify_truncated_and_missing_data_file(ckpt, capsys):
    data = naming.data_path(ckpt, 0, 1)
    os.truncate(data, os.path.getsize(data) - 3)
    assert main(["verify", ckpt]) == 1
    out = capsys.readouterr().out
    assert "BAD words" in out and data in out and "truncated" in out
    os.remove(data)
    assert main(["verify", ckpt]) == 1
    out = capsys.readouterr().out
    assert out.count("BAD ") == 3 and "not found" in out
    with open(ckpt + ".index", "r+b") as f:
        f.write(b"garbage")
    assert main(["verify", ckpt]) == 1
    out = capsys.readouterr().out
    assert out.startswith("BAD (index): ") and ckpt + ".index" in out


def test_verify_checks_partitioned_slices(tf, tmp_path, capsys):
    full = np.arange(12, dtype=np.float32).reshape(4, 3)
    tf.raw_ops.SaveV2(prefix=str(tmp_path / "whole"), tensor_names=["p", "p"],
                      shape_and_slices=["4 3 0,2:-", "4 3 2,2:-"], tensors=[full[:2], full[2:]])
    assert main(["verify", str(tmp_path / "whole")]) == 0
    capsys.readouterr()
    # A valid index whose slices cover half the tensor: TF refuses to read it, so must verify.
    tf.raw_ops.SaveV2(prefix=str(tmp_path / "half"), tensor_names=["p"], shape_and_slices=["4 3 0,2:-"],
                      tensors=[full[:2]])
    assert main(["verify", str(tmp_path / "half")]) == 1
    out = capsys.readouterr().out
    assert "BAD p: " in out and "cover 6 of its 12 elements" in out and str(tmp_path / "half.index") in out


def test_verify_reads_in_bounded_memory(tmp_path, capsys):
    prefix = gpusaver.save(str(tmp_path / "big"), {"x": np.ones(64 * MiB // 4, np.float32),
                                                   "y": np.ones(32 * MiB // 4, np.float32)})
    tracemalloc.start()
    try:
        assert main(["verify", prefix]) == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB, f"verify of 96 MiB held {peak / MiB:.1f} MiB at once"


def _run_in_terminal(args) -> tuple[int, str]:
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "gpusaver", *args], stdin=slave, stdout=slave, stderr=slave,
                            env=_env(), close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO once the child has closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=120), b"".join(chunks).decode("utf-8", "replace")


def test_verify_progress_bar_on_a_terminal_only(tmp_path):
    prefix = gpusaver.save(str(tmp_path / "big"), {"x": np.ones(16 * MiB // 4, np.float32)})
    status, screen = _run_in_terminal(["verify", prefix])
    assert status == 0, screen
    assert "━" in screen and "16.0 MiB" in screen and "OK: 1 tensors" in screen
    proc = _cli("verify", prefix)  # pipes, not a terminal: the report only
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("OK: 1 tensors") and "━" not in proc.stdout


# --- diff / latest ------------------------------------------------------------------------------
def test_diff_reports_added_removed_and_changed(tmp_path, capsys):
    a = gpusaver.save(str(tmp_path / "a"), {
        "same": np.arange(4.0), "gone": np.zeros(2), "dtype": np.zeros(2, np.float32),
        "shape": np.zeros((2, 3)), "values": np.array([1.0, 2.0, np.nan, 4.0]), "text": np.array([b"x"], object)})
    b = gpusaver.save(str(tmp_path / "b"), {
        "same": np.arange(4.0), "new": np.ones(1), "dtype": np.zeros(2, np.float64),
        "shape": np.zeros((3, 2)), "values": np.array([1.0, 2.5, np.nan, 4.0]), "text": np.array([b"y"], object)})
    assert main(["diff", a, b]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "+ new" in out and "- gone" in out
    assert "~ dtype: dtype float32 -> float64" in out
    assert "~ shape: shape [2,3] -> [3,2]" in out
    assert "~ values: values differ in 1 of 4 elements, max |a-b| 0.5" in out  # NaN == NaN in a diff
    assert "~ text: values differ in 1 of 1 elements" in out
    assert out[-1] == "1 added, 1 removed, 4 changed, 1 unchanged"
    assert main(["diff", a, b, "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["added"] == ["new"] and result["removed"] == ["gone"] and result["same"] == 1
    assert [c["name"] for c in result["changed"]] == ["dtype", "shape", "text", "values"]
    assert main(["diff", a, a]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "0 added, 0 removed, 0 changed, 6 unchanged"


def test_latest(ckpt, tmp_path, capsys):
    assert main(["latest", str(tmp_path)]) == 0
    assert capsys.readouterr().out == ckpt + "\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["latest", str(empty)]) == 1
    assert "no latest checkpoint" in capsys.readouterr().err


# --- logger -------------------------------------------------------------------------------------
def test_log_done_reports_seconds_and_rate(caplog):
    from gpusaver.log import log_done
    with caplog.at_level(logging.INFO, logger="gpusaver"):
        log_done("save", "ckpt/model-1", 2 << 30, 0.5)
    (record,) = [r for r in caplog.records if r.name == "gpusaver"]
    assert record.levelno == logging.INFO
    assert "save ckpt/model-1" in record.getMessage()
    assert "0.500 s" in record.getMessage() and "4.00 GiB/s" in record.getMessage()


def test_library_logger_is_silent_unless_configured():
    code = ("import logging, gpusaver.log; logging.getLogger('gpusaver').warning('not shown'); "
            "gpusaver.log.log_done('save', 'p', 1, 1.0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr


# --- bench and demo -----------------------------------------------------------------------------
def test_bench_fails_when_a_measurement_fails():
    """A peak-memory child that crashed (as they did outside the repository) fails the run; the
    end-to-end run from elsewhere, into a fresh folder, is test_bench_smoke.py::test_bench_tiny_cpu."""
    from gpusaver.cli.run import failures
    record = {"label": "mix 4 MiB float32", "restore_correct": {"gpusaver restore": True},
              "memory": {"gpusaver save": {"error": "exit 1: No module named gpusaver.bench.cpu"}}}
    (line,) = failures([record], None)
    assert "gpusaver save" in line and "No module named" in line
    record["memory"]["gpusaver save"] = {"peak_rss_bytes": 1, "baseline_rss_bytes": 1}
    assert failures([record], None) == []
    record["restore_correct"]["gpusaver restore"] = False
    assert failures([record], None) == ["mix 4 MiB float32: gpusaver restore restored wrong values"]


def test_bench_out_defaults_to_a_fresh_folder(tmp_path):
    from gpusaver.cli import parser
    from gpusaver.cli.run import fresh_folder
    assert parser().parse_args(["bench", "--tiny"]).out is None
    first, second = fresh_folder(str(tmp_path)), fresh_folder(str(tmp_path))
    assert first != second and os.path.isdir(first) and os.path.isdir(second)
    assert os.path.basename(first).startswith("gpusaver-bench-")


def test_demo_uses_a_temporary_directory_and_no_tensorflow_noise(tmp_path):
    env = {k: v for k, v in _env().items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = _cli("demo", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK: restored 4 variables match" in proc.stdout
    assert ("OK: model and optimizer (14 variables) restored by gpusaver.Checkpoint and by tf.train.Checkpoint "
            "(assert_consumed) match") in proc.stdout
    assert proc.stderr == ""
    assert list(tmp_path.iterdir()) == []  # nothing left in the working directory


def test_demo_dir_keeps_both_checkpoints_tf_reads_as_objects(tmp_path, capsys):
    tf = pytest.importorskip("tensorflow")
    assert main(["demo", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    ckpts = str(tmp_path / "ckpts")
    assert f"through gpusaver.CheckpointManager to {ckpts}/ckpt-1" in out
    # the name-based checkpoint beside the object-based one, each named by its state file
    assert tf.train.latest_checkpoint(str(tmp_path)) == str(tmp_path / "model-1")
    assert tf.train.latest_checkpoint(ckpts) == os.path.join(ckpts, "ckpt-1")
    from tensorflow.core.protobuf import trackable_object_graph_pb2
    reader = tf.train.load_checkpoint(os.path.join(ckpts, "ckpt-1"))
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    assert {c.local_name for c in graph.nodes[0].children} == {"model", "optimizer", "save_counter"}
    # each variable once (TF keys a variable by the first path to it): 4 weights, Adam's step,
    # learning rate and 2 x 4 slots, and the save counter
    keys = set(reader.get_variable_to_shape_map()) - {"_CHECKPOINTABLE_OBJECT_GRAPH"}
    assert len(keys) == 15 and "save_counter/.ATTRIBUTES/VARIABLE_VALUE" in keys


# --- project files ------------------------------------------------------------------------------
def test_license_urls_and_changelog():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    urls = project["urls"]
    assert {"Homepage", "Repository", "Issues"} <= set(urls)
    assert all(u.startswith("https://github.com/gpusaver/gpusaver") for u in urls.values())
    assert "cli" in project["optional-dependencies"]
    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        changelog = f.read()
    assert changelog.startswith("# Changelog") and "## [Unreleased]" in changelog
