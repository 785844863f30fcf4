"""The command line: ``fleet serve``, ``fleet run``, ``fleet demo`` and the operator commands."""
