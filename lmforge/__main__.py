"""`python -m lmforge`, the form `accelerate launch -m lmforge ...` and `torchrun -m lmforge ...` run: the CLI."""

from lmforge.cli import main

if __name__ == "__main__":
    main()
