"""The outbox: every queued video's describe message sent and confirmed, and sent again
when it was lost (a producer killed before the broker confirmed it, a broker that hung, a
worker that died holding the video).

Shared by the producer (`enqueue`, `reap`) and the describe worker (its periodic sweep), so
it sits below both and above `db` and `broker`, whose verbs it combines. `heartbeat.py`
holds the loop both workers' heartbeat threads run (renew, then sweep). Never torch.
"""
