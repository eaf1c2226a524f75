"""The command line on top of every room: one module per command group; no other room imports it."""
