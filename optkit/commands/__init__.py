"""One module per ``optkit`` subcommand (and ``loading``: the options they share)."""
