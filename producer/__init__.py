"""The producer: the captioner CLI, source expansion and job control. Never imports torch."""
