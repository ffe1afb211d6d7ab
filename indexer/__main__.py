"""`python -m indexer ...` and `torchrun -m indexer build ...`."""

from indexer.cli import main

if __name__ == "__main__":
    main()
