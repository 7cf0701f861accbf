"""The application layer: the ``vlmtools`` command (:mod:`vlmtools_app.cli`), its subcommands, the demo
report, sharded evaluation and loading a model by zoo name. It stands on everything else (core, the
three method packages, the zoo); nothing imports it."""
