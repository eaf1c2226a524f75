"""The caption worker: the caption service (micro-batching, the model held once), the chunk and container protocol,
and its Celery tasks. No other room imports it."""
