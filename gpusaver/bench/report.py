"""Bench output: machine description, the JSON of every raw timing, a markdown table, a PNG, targets.

Everything here works on the plain dicts the benches return, so a JSON file from another machine can be
re-reported (``write_all(json.load(f), out_dir)``).
"""
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess

import gpusaver
from gpusaver.bench import GiB, MiB, summary

PHASE_TITLES = {"save": "save, page cache", "fsync": "save + fsync", "restore": "restore, page cache"}
V1_SAVE, V1_RESTORE = "tf.compat.v1 Saver.save", "tf.compat.v1 Saver.restore"
COPY_CASE = "gpusaver save_async snapshot=copy"


# --- machine ------------------------------------------------------------------------------------
def _read(path: str, default: str = "") -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _disk(path: str) -> dict:
    """The mount holding ``path``: device, file system, rotational flag (from /proc and /sys)."""
    path = os.path.realpath(path)
    best = ("", "", "", "")
    for line in _read("/proc/mounts").splitlines():
        dev, mnt, fstype, opts = (line.split() + ["", "", "", ""])[:4]
        if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
            best = (dev, mnt, fstype, opts)
    block = re.sub(r"p?\d+$", "", os.path.basename(best[0])) if best[0].startswith("/dev/") else ""
    rotational = _read(f"/sys/block/{block}/queue/rotational").strip() if block else ""
    usage = os.statvfs(path)
    return {"device": best[0], "mount": best[1], "fstype": best[2], "options": best[3],
            "model": _read(f"/sys/block/{block}/device/model").strip() if block else "",
            "rotational": {"1": True, "0": False}.get(rotational),
            "free_bytes": usage.f_bavail * usage.f_frsize}


def _gpus() -> list[dict]:
    try:  # NVML support is optional and may not be installed or written yet
        from gpusaver.bench import nvml
        return [dataclasses.asdict(g) if dataclasses.is_dataclass(g) else dict(g) for g in nvml.device_info()]
    except Exception as e:  # advisory only: a report without GPU facts is still a report
        return [{"error": f"{type(e).__name__}: {e}"}]


def _commit() -> str | None:
    """The gpusaver checkout's commit, "-dirty" if the library (the bench and CLI aside) has local
    changes; None outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(gpusaver.__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "gpusaver",
                                ":!gpusaver/bench", ":!gpusaver/cli.py"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def machine(out_dir: str) -> dict:
    """CPU model, cores, memory, the output disk, library versions and GPUs (NVML) of this machine."""
    cpuinfo = _read("/proc/cpuinfo")
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s+(\d+) kB", _read("/proc/meminfo"), re.M)
    return {
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": int(mem.group(1)) * 1024 if mem else None,
        "disk": _disk(out_dir),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {**{d: _version(d) for d in ("tensorflow", "numpy", "keras", "crc32c", "ml_dtypes",
                                                 "safetensors", "torch",
                                                 "cupy-cuda12x", "cupy-cuda13x", "nvidia-ml-py")},
                     "gpusaver": gpusaver.__version__,  # also when run from a checkout, not installed
                     "gpusaver_commit": _commit()},
        "gpus": _gpus(),
    }


# --- numbers ------------------------------------------------------------------------------------
def metric(case: dict, key: str = "seconds") -> dict:
    """Median/min/max of one metric over a case's counted runs (seconds)."""
    return summary([r[key] for r in case["runs"] if key in r])


def stall(case: dict) -> float:
    """Median seconds a training loop is blocked: until return for async saves, else the whole save."""
    key = "return_s" if case["runs"] and "return_s" in case["runs"][0] else "seconds"
    return metric(case, key)["median"]


#: The raw limit each phase's per-tensor cost is measured over.
LIMIT_OF_PHASE = {"save": "limit: write", "fsync": "limit: write + fsync", "restore": "limit: read"}


def per_tensor_us(record: dict, name: str) -> float | None:
    """Microseconds per tensor that contender ``name`` spends beyond the raw limit of its phase
    (plain write, write + fsync, read-back of the same bytes): (median - limit median) / tensors.
    None for the limits themselves or where the record has no such limit."""
    case = record["cases"][name]
    limit = LIMIT_OF_PHASE.get(case["phase"])
    if name.startswith("limit:") or limit not in record["cases"]:
        return None
    extra = metric(case)["median"] - metric(record["cases"][limit])["median"]
    return extra / record["num_tensors"] * 1e6


def rows(record: dict) -> list[dict]:
    """One table row per contender of a CPU workload record."""
    out = []
    for name, case in record["cases"].items():
        s = metric(case)
        mem = record.get("memory", {}).get(name, {})
        first = case["warmup"][0]["seconds"] if case.get("warmup") else None  # the cold first call
        out.append({"contender": name, "phase": case["phase"], **s, "first": first,
                    "gib_s": record["nbytes"] / GiB / s["median"] if s["median"] > 0 else math.nan,
                    "stall": stall(case) if case.get("stall") else None,
                    "us_per_tensor": per_tensor_us(record, name),
                    "peak_extra_mib": mem["peak_extra_bytes"] / MiB if "peak_extra_bytes" in mem else None,
                    "retained_mib": mem["retained_bytes"] / MiB if "retained_bytes" in mem else None,
                    "restore_ok": record.get("restore_correct", {}).get(name)})
    return out


def targets(record: dict) -> list[dict]:
    """The design's CPU targets for one workload record: PASS/MISS with the measured ratio."""
    c, out = record["cases"], []

    def add(name, ratio, ok, detail):
        out.append({"workload": record["label"], "target": name, "ratio": ratio, "pass": bool(ok), "detail": detail})

    if "gpusaver save" in c and V1_SAVE in c:
        g, t = metric(c["gpusaver save"])["median"], metric(c[V1_SAVE])["median"]
        add("save >= 2x tf.compat.v1 Saver.save", t / g, t / g >= 2, f"gpusaver {g:.3f} s vs TF {t:.3f} s")
    if "gpusaver restore" in c and V1_RESTORE in c:
        g, t = metric(c["gpusaver restore"])["median"], metric(c[V1_RESTORE])["median"]
        add("restore >= 1.5x Saver.restore", t / g, t / g >= 1.5, f"gpusaver {g:.3f} s vs TF {t:.3f} s")
    if "gpusaver save_async" in c and V1_SAVE in c:
        r, t = stall(c["gpusaver save_async"]), metric(c[V1_SAVE])["median"]
        add("save_async return <= 2% of TF sync save", r / t, r / t <= 0.02,
            f"returns in {r * 1e3:.1f} ms vs TF save {t:.3f} s")
    out += workload_targets(record)
    mem = record.get("memory", {}).get(COPY_CASE, {})
    if "peak_extra_bytes" in mem:
        limit = record["copy_budget_bytes"] + 64 * MiB
        add("copy-mode peak extra <= budget + 64 MiB", mem["peak_extra_bytes"] / limit,
            mem["peak_extra_bytes"] <= limit,
            f"{mem['peak_extra_bytes'] / MiB:.0f} MiB vs {limit / MiB:.0f} MiB "
            f"(budget {record['copy_budget_bytes'] / MiB:.0f} MiB)")
    return out


#: Issue 14 / DESIGN.md, per workload: (save vs the plain write as a fraction, or vs TF's Saver as a
#: multiple), restore vs TF's Saver, and the save_async stall as a fraction of TF's synchronous save.
WORKLOAD_TARGETS = {
    "mix": {"save_of_write": 0.9, "restore_x_tf": 3},
    "small": {"save_of_write": 0.8, "restore_x_tf": 3},
    "many": {"save_x_tf": 10, "restore_x_tf": 5, "async_of_tf": 0.01},
}


def workload_targets(record: dict) -> list[dict]:
    """The targets DESIGN.md sets for this workload kind (see :data:`WORKLOAD_TARGETS`)."""
    c, want, out = record["cases"], WORKLOAD_TARGETS.get(record["workload"], {}), []

    def med(name):
        return metric(c[name])["median"] if name in c else None

    def add(name, ratio, ok, detail):
        out.append({"workload": record["label"], "target": name, "ratio": ratio, "pass": bool(ok), "detail": detail})

    g, t, w = med("gpusaver save"), med(V1_SAVE), med("limit: write")
    gr, tr = med("gpusaver restore"), med(V1_RESTORE)
    if "save_of_write" in want and g and w:
        x, wc = want["save_of_write"], med("limit: write + CRC32C")
        checksummed = f"; write + CRC32C {wc:.3f} s" if wc else ""
        add(f"save >= {x:.0%} of plain write", w / g, w / g >= x,
            f"gpusaver {g:.3f} s vs plain write {w:.3f} s{checksummed}")
    if "save_x_tf" in want and g and t:
        x = want["save_x_tf"]
        add(f"save >= {x}x Saver.save", t / g, t / g >= x, f"gpusaver {g:.3f} s vs TF {t:.3f} s")
    if "restore_x_tf" in want and gr and tr:
        x = want["restore_x_tf"]
        add(f"restore >= {x}x Saver.restore", tr / gr, tr / gr >= x, f"gpusaver {gr:.3f} s vs TF {tr:.3f} s")
    if "async_of_tf" in want and "gpusaver save_async" in c and t:
        r, x = stall(c["gpusaver save_async"]), want["async_of_tf"]
        add(f"save_async return <= {x:.0%} of TF sync save", r / t, r / t <= x,
            f"returns in {r * 1e3:.1f} ms vs TF save {t:.3f} s")
    return out


def cost_line(record: dict) -> str:
    """The per-tensor cost of one workload, gpusaver beside TF's Saver, over the plain write / read."""
    c = record["cases"]

    def us(name):
        return _f(per_tensor_us(record, name) if name in c else None, ".1f")
    return (f"Per tensor over the limit ({record['num_tensors']} tensors): save {us('gpusaver save')} µs "
            f"(TF Saver {us(V1_SAVE)} µs) over the plain write; restore {us('gpusaver restore')} µs "
            f"(TF Saver {us(V1_RESTORE)} µs) over the plain read.")


def target_lines(all_targets: list[dict]) -> list[str]:
    return [f"{'PASS' if t['pass'] else 'MISS'}  {t['target']} [{t['workload']}]: ratio {t['ratio']:.3g} "
            f"({t['detail']})" for t in all_targets]


# --- markdown -----------------------------------------------------------------------------------
def _f(x, fmt):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _memory(row: dict) -> str:
    if row["peak_extra_mib"] is None:
        return "—"
    return f"{row['peak_extra_mib']:.0f} ({_f(row['retained_mib'], '.0f')})"


def markdown(result: dict) -> str:
    """results.md: the command, the machine, one table per workload, GPU numbers, targets."""
    m = result["machine"]
    lines = [f"# gpusaver bench ({result['created']})", "",
             f"Command: `{result['command']}`  ", f"Machine: {m['cpu_model']}, {m['usable_cores']} cores, "
             f"{_f((m['memory_bytes'] or math.nan) / GiB, '.0f')} GiB RAM, disk {m['disk']['device']} "
             f"({m['disk']['fstype']}, rotational={m['disk']['rotational']}); "
             f"TF {m['versions']['tensorflow']}, numpy {m['versions']['numpy']}, "
             f"gpusaver {m['versions']['gpusaver']} ({m['versions'].get('gpusaver_commit')})", "",
             "Times are medians of the counted runs (min–max in brackets); GiB/s = model bytes / median; "
             "stall = time the caller is blocked (until return for async saves); warm-up = the uncounted "
             "first call (one-time costs such as tracing); peak extra = peak RSS "
             "over two consecutive runs minus RSS after the model was built, in a fresh process per "
             "contender (in brackets: what stayed resident after them). Saves start with all earlier "
             "output deleted, dirty pages flushed and 2x the model bytes of free memory touched (on VMs "
             "that hand idle free memory back to the host, the next touch is ~10x slower); restores read "
             "from the page cache. Contenders are interleaved, the order rotated each round.", ""]
    for record in result["cpu"]:
        lines += [f"## {record['label']} — {record['num_tensors']} tensors, {record['nbytes'] / MiB:.1f} MiB", "",
                  "| contender | phase | median s | min–max s | GiB/s | µs/tensor over limit | stall s | warm-up s "
                  "| peak extra MiB (kept) | restore ok |", "|---|---|---:|---:|---:|---:|---:|---:|---:|:-:|"]
        for r in rows(record):
            ok = {True: "yes", False: "**NO**", None: ""}[r["restore_ok"]]
            lines.append(f"| {r['contender']} | {PHASE_TITLES.get(r['phase'], r['phase'])} | "
                         f"{_f(r['median'], '.3f')} | {_f(r['min'], '.3f')}–{_f(r['max'], '.3f')} | "
                         f"{_f(r['gib_s'], '.2f')} | {_f(r['us_per_tensor'], '.1f')} | {_f(r['stall'], '.3f')} | {_f(r['first'], '.2f')} | {_memory(r)} | {ok} |")
        lines += ["", cost_line(record)]
        errors = {n: m["error"] for n, m in record.get("memory", {}).items() if "error" in m}
        lines += [""] + [f"- memory child for {n} failed: `{e.splitlines()[-1] if e else e}`"
                         for n, e in errors.items()] + ([""] if errors else [])
    if result.get("peers"):
        from gpusaver.bench.peers import markdown_lines as peer_lines
        lines += peer_lines(result["peers"]) + [""]
    if result.get("gpu"):
        from gpusaver.bench.gpu import markdown_lines  # only when there is a GPU record
        lines += markdown_lines(result["gpu"]) + [""]
    lines += ["## Targets", "", "```", *target_lines(result["targets"]), "```", ""]
    return "\n".join(lines)


# --- plot ---------------------------------------------------------------------------------------
def plot(result: dict, path: str):
    """PNG: GiB/s per contender and workload (left), stall per contender and workload (right)."""
    import matplotlib
    matplotlib.use("Agg")  # no display on bench machines
    import matplotlib.pyplot as plt

    # GPU cases join the throughput panel as workloads of their own (they have no stall).
    records = result["cpu"] + [{"label": f"GPU {w['label']}", "nbytes": w["nbytes"], "cases": w["cases"]}
                               for w in (result.get("gpu") or {}).get("workloads", [])]
    names = list(dict.fromkeys(n for r in records for n in r["cases"]))
    stalls = [n for n in names if any(r["cases"].get(n, {}).get("stall") for r in records)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, 0.35 * len(names) + 2.5), width_ratios=[3, 2])
    height = 0.8 / max(1, len(records))
    for i, r in enumerate(records):
        data = {x["contender"]: x for x in rows(r)}
        ys = [k + i * height for k in range(len(names))]
        bars = ax1.barh(ys, [data[n]["gib_s"] if n in data else 0 for n in names], height, label=r["label"])
        ax1.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        ys = [k + i * height for k in range(len(stalls))]
        bars = ax2.barh(ys, [data[n]["stall"] if n in data and data[n]["stall"] else 0 for n in stalls], height,
                        label=r["label"])
        ax2.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    for ax, labels, title in ((ax1, names, "throughput, GiB/s (model bytes / median time)"),
                              (ax2, stalls, "stall: seconds the caller is blocked (median)")):
        ax.set_yticks([k + 0.4 - height / 2 for k in range(len(labels))], labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=8)
    ax2.set_xscale("symlog", linthresh=0.01)
    fig.suptitle(f"gpusaver bench — {result['machine']['cpu_model']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- all of it ----------------------------------------------------------------------------------
def assemble(cpu_records: list[dict], gpu_record: dict | None, out_dir: str, command: str, config: dict,
             peers: list[dict] | None = None) -> dict:
    """The whole result: ``peers`` are the records of the TF-free peers bench, if it ran."""
    result = {"schema": 1, "created": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": command, "config": config, "machine": machine(out_dir),
              "cpu": cpu_records, "gpu": gpu_record, "peers": peers or []}
    result["targets"] = [t for r in cpu_records for t in targets(r)]
    if peers:
        from gpusaver.bench.peers import targets as peer_targets
        result["targets"] += [t for r in peers for t in peer_targets(r)]
    return result


def write_all(result: dict, out_dir: str) -> dict[str, str]:
    """Write results.json, results.md and results.png into ``out_dir``; return {kind: path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"results.{k}") for k in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(markdown(result))
    if result["cpu"] or result.get("gpu"):
        plot(result, paths["png"])
    else:
        paths.pop("png")
    return paths
