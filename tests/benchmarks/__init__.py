"""The benchmark suite: audiosockets beside a minimal forwarder and Wyoming, in one run.

Not part of the default test run (see ``conftest.py``). Run it from the repository root::

    python -m tests.benchmarks            # the full run (about 40 minutes)
    python -m tests.benchmarks --quick    # a few seconds per step (about 6 minutes)

It prints one table and writes ``tests/benchmarks/results/<utc time>-<mode>.json``.

Every row runs each system with the same process layout (relay, publishers and
subscribers each in their own OS process, as ``audiosockets loadtest`` does), the same
event loop (uvloop where installed), the same chunks and the same accounting: the
audiosockets rows *are* ``audiosockets.loadtest``'s children; the two references
(``forwarder.py``, ``wyoming_relay.py``) provide children that speak the same pipe
protocol, so one orchestrator (``harness.py``) and one report (``loadtest._report``)
serve all of them.
"""
