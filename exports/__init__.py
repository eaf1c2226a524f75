"""Exports of a job's rows: row shaping, the format writers, and placing the result atomically or uploading it."""
