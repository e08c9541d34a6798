"""`python -m megaflow ...` runs the command-line interface."""
from megaflow.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
