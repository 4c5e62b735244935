"""The ``gradfix`` command line: entry point in :mod:`gradfix.cli.main`, options in
:mod:`gradfix.cli.options`, command handlers in :mod:`gradfix.cli.commands`, ``inspect`` and ``zoo``
in their own modules, ``--config`` handling in :mod:`gradfix.cli.config`."""
