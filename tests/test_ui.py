import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from qdistill.ui import map_with_progress


def slow_square(x, delay):
    time.sleep(delay)
    if x < 0:
        raise ValueError(f"negative {x}")
    return x * x


def test_results_come_in_job_order_whatever_finishes_first():
    with ThreadPoolExecutor(3) as pool:
        assert map_with_progress(pool, slow_square, [(1, 0.2), (2, 0.0), (3, 0.1)], "squares", quiet=True) == [1, 4, 9]


def test_a_failed_job_raises_its_error():
    with ThreadPoolExecutor(2) as pool, pytest.raises(ValueError, match="negative -1"):
        map_with_progress(pool, slow_square, [(1, 0.0), (-1, 0.0)], "squares", quiet=True)
