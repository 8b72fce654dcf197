"""Implementations that are not nlattn's, with the adapters that put them under nlattn's conformance
suite (docs/conformance-third-party.md): what a project does to check its own code."""
