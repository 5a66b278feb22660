"""Measures: the queue, tarball and digest benchmarks (``measures``), the many-hosts
benchmark (``hosts``), the ``bench`` command (``cli``), and the real Redis server and
worker processes they (and the tests) start (``localfarm``).

Floor 7 of the worker: may import anything below it; never imported by a room below it,
only by the top-level ``cli``."""
