"""The ``flashcomm`` command line (click + rich): ``flashcomm_cupy.cli.main:main`` is the entry point.

Importing this package imports nothing else; each command loads on first use.
"""
