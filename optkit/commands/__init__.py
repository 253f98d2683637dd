"""One module per ``optkit`` subcommand."""
