"""Caption worker: settings, queue contract, image loading, GIT engine, batching, ledger and Celery tasks."""
