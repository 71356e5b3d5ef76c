"""Thin commands: parse config, call the library, exit."""
