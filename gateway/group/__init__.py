"""Several worker processes on one port acting as one gateway (``voxray serve --workers N``).

``supervisor`` binds the port once, starts the workers, restarts a worker that dies and drains them all
on SIGTERM; ``hub`` (run by the supervisor) holds the group's sessions and routes control requests,
metrics and readiness between workers; ``member`` is a worker's side of it; ``wire`` is their protocol.
"""
