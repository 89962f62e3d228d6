"""The resilience layers: admission, leases, queueing and guarded calls.

Nothing here knows about HTTP; it decides and emits events as plain data.
"""
