"""Local servers for tests, benchmarks and the walkthrough: real processes on loopback.

``devservers.s3`` runs an S3-compatible server (moto) behind a counting proxy; ``devservers.resource_api``
runs the resource API through the same CLI an operator uses. Both ``tests/`` and ``bench/`` import
them (``bench/`` never imports ``tests/``). They need the test extra (``pip install -e '.[test]'``).
"""
