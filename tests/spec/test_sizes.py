"""parse_size, the one reader of sizes: mergekit's K/M/B, byte units, plain counts; errors."""

from __future__ import annotations

import pytest

from mergeflow.errors import MergeflowError
from mergeflow.exec.options import RunOptions
from mergeflow.spec.sizes import parse_size


@pytest.mark.parametrize("text, expected", [
    # mergekit's parse_kmb: K/M/B, decimal, either case; B is a billion, not a byte
    ("5B", 5_000_000_000), ("5b", 5_000_000_000), ("500M", 500_000_000), ("100K", 100_000),
    ("100k", 100_000), ("5000000000", 5_000_000_000),
    # byte units as dask reads them: decimal xB and x, binary xiB and xi
    ("4GB", 4_000_000_000), ("4G", 4_000_000_000), ("4gb", 4_000_000_000),
    ("4GiB", 2**32), ("4Gi", 2**32), ("512MiB", 512 * 2**20), ("1KiB", 1024),
    ("1TB", 10**12), ("2TiB", 2 * 2**40), ("100KB", 100_000), ("1MB", 10**6),
    ("1.5G", 1_500_000_000), (".5K", 500), ("0.5B", 500_000_000), ("2e9", 2_000_000_000), ("1e3M", 10**9),
    (" 4 GB ", 4_000_000_000),
    # exact decimals: dask's float product gives 4099999999 and 8199999999
    ("4.1GB", 4_100_000_000), ("8.2GB", 8_200_000_000),
    (7, 7),
])
def test_golden_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text, message", [
    ("0", "must be more than 0 bytes: '0'"),
    ("0B", "must be more than 0 bytes: '0B'"),
    ("0GiB", "must be more than 0 bytes: '0GiB'"),
    ("-5GB", "must be more than 0 bytes: '-5GB'"),
    ("-1", "must be more than 0 bytes: '-1'"),
    (0, "must be more than 0 bytes: 0"),
    (-3, "must be more than 0 bytes: -3"),
    ("big", "not a size: 'big'"),
    ("GB", "not a size: 'GB'"),
    ("", "not a size: ''"),
    ("4XB", "not a size: '4XB'"),
    ("4 G B", "not a size: '4 G B'"),
    ("1.5", "not a whole number of bytes: '1.5'"),
    ("1.0005K", "not a whole number of bytes: '1.0005K'"),
])
def test_bad_sizes_are_refused(text, message):
    with pytest.raises(ValueError) as e:
        parse_size(text)
    assert str(e.value).startswith(message)
    assert str(e.value).endswith("(examples: 5B, 500M, 4GB, 4GiB)")


def test_run_options_read_memory_limit_with_the_same_function():
    assert RunOptions(memory_limit="4GiB").memory_limit == 2**32
    assert RunOptions(memory_limit="5B").memory_limit == 5_000_000_000
    assert RunOptions(memory_limit=3_000_000_000).memory_limit == 3_000_000_000
    assert RunOptions(memory_limit="auto").memory_limit == "auto"
    assert RunOptions().memory_limit is None
    with pytest.raises(MergeflowError) as e:
        RunOptions(memory_limit="0")
    assert str(e.value) == "memory_limit: must be more than 0 bytes: '0' (examples: 5B, 500M, 4GB, 4GiB)"
