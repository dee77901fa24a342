"""``python -m fsad_lightning.commands ...`` is ``fsad ...``."""

from fsad_lightning.commands.dispatch import main

if __name__ == "__main__":
    main()
