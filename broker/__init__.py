"""The message contract between the producers and the workers: queue and task names, the
Celery configuration they share, and sending a describe message.

Imports Celery and kombu, never torch or the worker: the producer sends through this."""
