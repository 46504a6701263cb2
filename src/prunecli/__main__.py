"""``python -m prunecli`` runs the command line."""

from prunecli.cli.main import main

if __name__ == "__main__":
    main()
