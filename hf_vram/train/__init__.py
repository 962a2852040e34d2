"""Runners (one per kind of training), their callbacks, and the multi-process launcher."""
