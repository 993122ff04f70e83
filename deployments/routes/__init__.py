"""The ingress's HTTP routes, one ``APIRouter`` per concern; ``deployments/ingress.py`` includes them.

A route parses HTTP and makes one call. Who may call it is a dependency (``deps.py``), and so is
every collaborator it calls, found on ``request.app.state``: routes never hold the Ingress.
"""
