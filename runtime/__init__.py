"""What every long-running process shares: the Celery configuration, log lines, Prometheus metrics."""
