"""Structured answers: a job's `schema` checked against the subset we support (`schema`), compiled for the grammar
backend (`grammar`), and its answers parsed into typed Arrow columns (`answers`). Plain JSON, pyarrow and jsonschema:
below every other room.
"""
