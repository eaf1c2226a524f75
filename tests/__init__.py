"""The test suite: real Redis, real worker processes, a tiny GIT built offline."""
