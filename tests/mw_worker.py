"""One worker of a MultiWorkerMirroredStrategy cluster on localhost, run by tests/test_distribute.py.

    python tests/mw_worker.py TASK PORTS DIRECTORY SCENARIO

Prints one JSON line (prefixed "RESULT ") with what it saw; the test compares the workers' lines.
Scenarios: "save" (gpusaver saves and restores; TF's own multi-worker checkpoint is read back),
"die" (worker 1 exits before its part is written: the others must fail cleanly, no commit),
"store" and "store-die" (the same two with DIRECTORY an object store URL, ``s3://...``, reached
with the fsspec options in the JSON of the environment variable MW_STORAGE_OPTIONS).
"""
import json
import os
import sys

task, ports, directory, scenario = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3], sys.argv[4]
os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                      "task": {"type": "worker", "index": task}})
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import gpusaver  # noqa: E402

strategy = tf.distribute.MultiWorkerMirroredStrategy()
rng = np.random.default_rng(0)  # the same values on every worker, as a mirrored model has
values = {f"layer{i}/kernel": rng.random((64 * (i + 1), 33), dtype=np.float32) for i in range(6)}
values.update({f"layer{i}/bias": rng.random(33, dtype=np.float32) for i in range(6)})
values["step"] = np.int64(1234)
with strategy.scope():
    variables = {name: tf.Variable(value, name=name.replace("/", "_")) for name, value in values.items()}

options = gpusaver.Options(collective_timeout=20, storage_options=json.loads(os.environ.get("MW_STORAGE_OPTIONS", "{}")))
saver = gpusaver.Saver(variables, options=options)
result = {"task": task}
join = (lambda *p: "/".join(p)) if "://" in directory else os.path.join
if scenario == "store":
    first = saver.save(join(directory, "ckpt"), global_step=1)
    for v in variables.values():
        v.assign(tf.zeros_like(v))
    second = saver.save(join(directory, "ckpt"), global_step=2)
    latest = gpusaver.latest_checkpoint(directory)
    saver.restore(first)
    restored = all(np.array_equal(variables[k].numpy(), values[k]) for k in values)
    objects = {k.replace("/", "_"): v for k, v in variables.items()}
    saved = gpusaver.Checkpoint(**objects, options=options).save(join(directory, "obj", "ckpt"))
    for v in variables.values():
        v.assign(tf.zeros_like(v))
    gpusaver.Checkpoint(**objects, options=options).restore(saved).assert_consumed()
    result.update(first=first, second=second, latest=latest, restored=restored, object_based=saved,
                  object_restored=all(np.array_equal(variables[k].numpy(), values[k]) for k in values))
elif scenario == "save":
    first = saver.save(os.path.join(directory, "ckpt"), global_step=1)
    for v in variables.values():
        v.assign(tf.zeros_like(v))
    second = saver.save(os.path.join(directory, "ckpt"), global_step=2)
    saver.restore(first)
    result.update(first=first, second=second,
                  restored=all(np.array_equal(variables[k].numpy(), values[k]) for k in values))
    # TF's own multi-worker checkpoint (chief to the real path, the others to temporary ones, as
    # TF's guide does it), read back by gpusaver's object-based restore.
    path = os.path.join(directory, "tf" if task == 0 else f"tf_temp_{task}")
    written = tf.train.Checkpoint(**{k.replace("/", "_"): v for k, v in variables.items()}).write(path)
    for v in variables.values():
        v.assign(tf.zeros_like(v))
    # TF's write has no barrier: wait until every worker (the chief above all) has written.
    strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(1)), axis=None)
    gpusaver.Checkpoint(**{k.replace("/", "_"): v for k, v in variables.items()}).read(
        os.path.join(directory, "tf")).assert_consumed()
    # gpusaver's object-based checkpoint across the workers, restored by TF's own Checkpoint.
    objects = {k.replace("/", "_"): v for k, v in variables.items()}
    saved = gpusaver.Checkpoint(**objects).save(os.path.join(directory, "obj", "ckpt"))
    for v in variables.values():
        v.assign(tf.zeros_like(v))
    tf.train.Checkpoint(**objects).restore(saved).assert_consumed()
    result.update(object_based=saved,
                  object_restored=all(np.array_equal(variables[k].numpy(), values[k]) for k in values))
    result.update(tf_written=written,
                  tf_restored=all(np.array_equal(variables[k].numpy(), values[k]) for k in values))
elif scenario in ("die", "store-die"):
    first = saver.save(join(directory, "ckpt"), global_step=1)
    if task == 1:
        os._exit(3)  # dies before the second save: the others wait at the barrier, then give up
    try:
        saver.save(join(directory, "ckpt"), global_step=2)
        result["error"] = None
    except gpusaver.GpusaverError as e:
        result["error"] = f"{type(e).__name__}: {e}"
print("RESULT " + json.dumps(result), flush=True)
