"""Decode cache: speed-up of a cached load over the first decode, and the cache's size.

Arranges the real HAM10000 subset of ../shared/data (5,984 training images at 128 px and the
official metadata) into the official layout with symlinks, then, in one run on this machine:

1. loads the ``train`` split at 64 px with an empty cache (decodes and resizes every JPEG,
   writes the uint8 cache file);
2. loads it again several times (maps the cache file) and takes the median;
3. checks that both loads return bit-identical tensors, reports the ratio and the cache size,
   and writes the section "Decode cache" of docs/performance.md.

Target: cached load at least 10x faster than the first decode. Exit status 1 if missed.

    python benchmarks/data_cache.py [--shared ../shared/data] [--image-size 64] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _report import write_section  # noqa: E402

TARGET = 10.0


def arrange_ham(shared: Path, root: Path) -> int:
    images = root / "HAM10000_images_part_1"
    images.mkdir(parents=True)
    (root / "HAM10000_metadata.csv").symlink_to(shared / "SivaAdithya+Machine-Learning" / "HAM10000_metadata.csv")
    count = 0
    for path in sorted((shared / "congtran19+XLA" / "images_resized").glob("ISIC_*.jpg")):
        if int(path.stem.split("_")[1]) < 34524:  # the HAM10000 training images (the rest are ISIC 2018 test)
            (images / path.name).symlink_to(path)
            count += 1
    return count


def measure(shared: Path, image_size: int, repeats: int) -> dict[str, float]:
    import torch

    from bench.data.base import get_dataset

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["BENCH_HOME"] = str(Path(tmp) / "home")  # empty cache
        root = Path(tmp) / "ham10000"
        n_files = arrange_ham(shared, root)
        dataset = get_dataset("ham10000")
        get_dataset("digits").load("test")  # warm up imports (torch, pandas, PIL) outside the timings
        start = time.perf_counter()
        first = dataset.load("train", root, image_size)
        decode_s = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            again = dataset.load("train", root, image_size)
            times.append(time.perf_counter() - start)
        if not (torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)):
            raise SystemExit("cached load differs from the first decode")
        cache = list((Path(tmp) / "home" / "data-cache").glob("ham10000-train-*.pt"))
        size = sum(p.stat().st_size for p in cache)
        return {"files": n_files, "images": len(first), "decode_s": decode_s, "cached_s": statistics.median(times),
                "cache_bytes": size}


def write_report(result: dict[str, float], image_size: int, passed: bool) -> None:
    import torch

    ratio = result["decode_s"] / result["cached_s"]
    section = (
        f"Measured by `benchmarks/data_cache.py` on {datetime.now(timezone.utc):%Y-%m-%d}, "
        f"{platform.platform()}, {os.cpu_count()} CPU cores, torch {torch.__version__}.\n"
        f"HAM10000 `train` split from the real subset in `../shared/data` ({int(result['images'])} images "
        f"of {int(result['files'])} present files, 128 px JPEG), loaded at {image_size} px.\n\n"
        "| measurement | value |\n| --- | ---: |\n"
        f"| first load (decode + resize + write cache) | {result['decode_s']:.2f} s |\n"
        f"| cached load (median of repeats, memory-mapped) | {result['cached_s']:.3f} s |\n"
        f"| speed-up | {ratio:.1f}x |\n"
        f"| cache file size | {result['cache_bytes'] / 2**20:.1f} MiB |\n\n"
        f"Target: cached load at least {TARGET:.0f}x faster than the first decode: "
        f"**{'PASS' if passed else 'FAIL'}**.\n"
    )
    write_section("Decode cache", section)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="do not update docs/performance.md")
    args = parser.parse_args()
    if not (args.shared / "congtran19+XLA" / "images_resized").is_dir():
        print(f"shared data not found at {args.shared}", file=sys.stderr)
        return 2
    result = measure(args.shared, args.image_size, args.repeats)
    ratio = result["decode_s"] / result["cached_s"]
    passed = ratio >= TARGET
    print(f"images: {int(result['images'])}  first decode: {result['decode_s']:.2f} s  cached: "
          f"{result['cached_s']:.3f} s  speed-up: {ratio:.1f}x  cache: {result['cache_bytes'] / 2**20:.1f} MiB  "
          f"target >= {TARGET:.0f}x: {'PASS' if passed else 'FAIL'}")
    if not args.no_write:
        write_report(result, args.image_size, passed)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
