"""Provider adapters: turn a chat request into an async stream of deltas.

Nothing here knows about limits, queues or HTTP requests from clients.
"""
