"""The resource API: the store of sealed models' small parts and data keys (docs/sealed-models.md).

A documented exception to "lib/ does not import FastAPI": the HTTP app lives in
:mod:`lib.resource_api.app` so it runs both standalone (``sealserve resource-api serve``) and as a
Serve application. Only that module imports FastAPI; everything else here is plain Python, so the
client (:mod:`lib.sealed.resource_client`) can share the wire schemas without pulling in a web framework.
"""
