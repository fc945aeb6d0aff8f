"""The benchmarks take minutes and are run on purpose (``python -m tests.benchmarks``),
never by the default ``python -m pytest``: nothing in this directory is collected."""

collect_ignore_glob = ["*.py"]
