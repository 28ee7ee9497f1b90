"""``python -m dinokit`` (and so ``torchrun -m dinokit train ...``)."""

from dinokit.cli import main

if __name__ == "__main__":
    main()
