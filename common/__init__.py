"""What every program shares: settings, the queue contract, named errors, Redis connections, the job ledger and
the model store. Plain Python: no Celery tasks and no torch, so the producer, the workers and training import it
alike."""
