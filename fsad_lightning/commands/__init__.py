"""The ``fsad`` subcommands, one module per family, under one dispatcher (:mod:`.dispatch`).

- :mod:`.dispatch`: ``fsad`` itself: the subcommand registry, ``--help``, ``--verbose``, the one-line
  error contract;
- :mod:`.lightning_cli`: ``fit`` / ``validate`` / ``test`` / ``predict`` (LightningCLI);
- :mod:`.benchmark`: ``fsad benchmark`` (categories x shots x seeds, tables);
- :mod:`.sweeps`: W&B sweep definitions expanded offline;
- :mod:`.generate`: ``fsad generate`` (anomaly-free image pools);
- :mod:`.configs`: bundled configs by name and ``fsad configs``;
- :mod:`.quiet`: the third-party noise filters the dispatcher installs.

Nothing outside this package imports it; it imports the rest of fsad_lightning.
"""
