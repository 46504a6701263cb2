"""prunecli: prune saved vision checkpoints from the shell.

The library API lives in :mod:`prunecli.api` (one function per subcommand); the command line in
:mod:`prunecli.cli`. Importing this package is cheap: torch and timm load only when a function that
needs them runs, which keeps ``prunecli --help`` and ``prunecli inspect`` fast.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
