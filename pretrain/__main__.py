"""`python -m pretrain ...` (also what `torchrun -m pretrain` runs on every rank)."""

from pretrain.cli import main

if __name__ == "__main__":
    main()
