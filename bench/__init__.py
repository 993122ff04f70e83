"""Benchmarks: each prints a table and writes ``bench/reports/<name>.json`` (+ ``.png``). Not tests."""
