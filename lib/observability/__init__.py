"""What a platform team scrapes and reads: sealserve's metrics and the shape of its logs.

``metrics`` defines every metric and the one-line calls the rest of the code makes; nothing here
imports Ray: ``deployments/observability.py`` installs the backend that hands the values to
``ray.util.metrics`` (exported by each node's metrics agent next to Serve's ``serve_*`` metrics).
``logs`` holds the logging rules (client errors in one line, never a traceback).
"""
