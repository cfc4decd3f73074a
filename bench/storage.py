"""CPU of one small S3 read through the storage door: a filesystem made for every call (the code
before: every shard read, part write and commit made its own) vs the reused one (now).

Each call is ``get_filesystem(uri)`` then one GET of a 1 kB object from a moto S3 server in a
process of its own, on loopback. Rounds alternate the two ways; printed: the CPU-ms of this
process per call, the median of the rounds, and the ratio.

Run: ``python bench/storage.py [--calls 20] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from s3_server import s3_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with s3_server() as (_, endpoint):
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
        import boto3

        from model import storage

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        uri = "s3://bench/one.bin"
        fs, path = storage.get_filesystem(uri)
        fs.pipe_file(path, b"x" * 1000)

        def call(fresh: bool) -> None:
            if fresh:  # as before: nothing kept between calls
                storage._S3_FILESYSTEMS.clear()
            fs, path = storage.get_filesystem(uri)
            fs.cat_file(path)

        ms: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for fresh in (True, False):
                cpu = time.process_time()
                for _ in range(args.calls):
                    call(fresh)
                ms[fresh].append(1000 * (time.process_time() - cpu) / args.calls)
    before, now = statistics.median(ms[True]), statistics.median(ms[False])
    print(f"CPU-ms per get_filesystem + 1 kB GET, median of {args.rounds} rounds of "
          f"{args.calls} calls")
    print(f"  a filesystem per call (before): {before:7.1f}   rounds "
          f"{', '.join(f'{x:.1f}' for x in ms[True])}")
    print(f"  reused (now):                   {now:7.1f}   rounds "
          f"{', '.join(f'{x:.1f}' for x in ms[False])}")
    print(f"  ratio: {before / now:.0f}x less CPU per call")


if __name__ == "__main__":
    main()
