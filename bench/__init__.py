"""Benchmarks of the session ledger: every store, the raw drivers and the peers, in one run.

``python -m bench`` (``--quick`` for a smoke run) prints one table and writes it
to ``bench/results.md``. A scenario is one function registered in
``bench.scenarios``; the systems it measures are in ``bench.systems`` (the
ledger on each store, the raw drivers) and ``bench.peers``. Benchmarks never
run as tests, and no test asserts a timing.
"""
